//! `conveyor report JOB`: a synthesis job's quality and privacy report as terminal tables, and
//! its `report.html` artifact written beside (charts to open in a browser, offline).

use anyhow::Context as _;
use serde_json::Value;
use std::{path::Path, process::ExitCode};

use crate::{
    print_json, strings,
    table::{score, Table},
    Client,
};

pub async fn report(client: &Client, job: &str, out: &Path) -> anyhow::Result<ExitCode> {
    let row = client.send(client.get(&format!("/v1/jobs/{job}"))).await?;
    if row["kind"] != "synthesis" {
        anyhow::bail!(
            "job {job} is a {} job: only a synthesis has a report",
            row["kind"].as_str().unwrap_or("?")
        );
    }
    if row["status"] != "succeeded" {
        anyhow::bail!(
            "job {job} is {}: its report comes when it succeeds",
            row["status"].as_str().unwrap_or("?")
        );
    }
    let report = client
        .send(client.get(&format!("/v1/jobs/{job}/artifacts/report.json")))
        .await?;
    let page = client
        .bytes(client.get(&format!("/v1/jobs/{job}/artifacts/report.html")))
        .await?;
    std::fs::write(out, &page).with_context(|| format!("writing {}", out.display()))?;
    if client.json {
        print_json(&report);
    } else {
        put!("{}", render(job, &report));
    }
    err!("wrote {} ({} bytes)", out.display(), page.len());
    Ok(ExitCode::SUCCESS)
}

fn number(value: &Value) -> String {
    match value.as_f64() {
        Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{v:.0}"),
        Some(v) => format!("{v:.3}"),
        None => "-".to_owned(),
    }
}

/// The report as text: headline scores, each column's shape, each pair's trend, privacy.
pub fn render(job: &str, report: &Value) -> String {
    let quality = &report["quality"];
    let rows = &report["rows"];
    let mut out = format!(
        "synthesis report of job {job}\nsynthesizer {}, seed {}\nrows: {} input, {} train, {} holdout, {} generated\n\n",
        report["synthesizer"].as_str().unwrap_or("?"),
        number(&report["seed"]),
        number(&rows["input"]),
        number(&rows["train"]),
        number(&rows["holdout"]),
        number(&rows["generated"]),
    );

    let mut headline = Table::new(&["QUALITY", "SCORE"], &[false, false]);
    for (label, key) in [
        ("overall", "overall"),
        ("column shapes", "column_shapes"),
        ("column pair trends", "column_pair_trends"),
    ] {
        headline.row(vec![label.into(), score(quality[key].as_f64())]);
    }
    out.push_str(&headline.render());

    let mut shapes = Table::new(&["COLUMN", "METRIC", "SCORE"], &[false, false, false]);
    for shape in quality["shapes"].as_array().into_iter().flatten() {
        shapes.row(vec![
            shape["column"].as_str().unwrap_or("?").into(),
            shape["metric"].as_str().unwrap_or("?").into(),
            score(shape["score"].as_f64()),
        ]);
    }
    out.push('\n');
    out.push_str(&shapes.render());

    let pairs = quality["pairs"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if !pairs.is_empty() {
        let mut table = Table::new(
            &["PAIR", "METRIC", "SCORE", "REAL", "SYNTHETIC"],
            &[false, false, false, true, true],
        );
        for pair in pairs {
            table.row(vec![
                strings(&pair["columns"]).join(" × "),
                pair["metric"].as_str().unwrap_or("?").into(),
                score(pair["score"].as_f64()),
                number(&pair["real_correlation"]),
                number(&pair["synthetic_correlation"]),
            ]);
        }
        out.push('\n');
        out.push_str(&table.render());
    }

    let privacy = &report["privacy"];
    let mut table = Table::new(&["PRIVACY", "VALUE"], &[false, false]);
    table.row(vec![
        "exact matches".into(),
        format!(
            "{:.2}% of synthetic rows equal a training row",
            privacy["exact_match_rate"].as_f64().unwrap_or(0.0) * 100.0
        ),
    ]);
    for (label, key) in [
        ("DCR synthetic→train (median)", "dcr_synthetic_to_train"),
        ("DCR holdout→train (median)", "dcr_holdout_to_train"),
    ] {
        table.row(vec![label.into(), number(&privacy[key]["median"])]);
    }
    let attack = &privacy["membership_inference"];
    if attack.is_object() {
        table.row(vec![
            "membership attack".into(),
            format!(
                "AUC {}, advantage {}",
                number(&attack["auc"]),
                number(&attack["advantage"])
            ),
        ]);
    }
    table.row(vec![
        "ε spent".into(),
        match privacy["epsilon_spent"].as_f64() {
            Some(epsilon) => format!("{epsilon} (differentially private)"),
            None => "none: not differentially private".into(),
        },
    ]);
    out.push('\n');
    out.push_str(&table.render());
    out
}
