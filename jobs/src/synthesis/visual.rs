//! The synthesis report as pictures: per-column distributions (real against synthetic, added to
//! `report.json` as `distributions`) and `report.html`, a self-contained page of inline SVG
//! drawn from `report.json` alone (no script, no network), to open offline.

use serde_json::{json, Value};
use std::fmt::Write;

use super::{
    profile::Role,
    table::{Table, Values},
};

/// Bins of a numeric or date column's histogram.
const BINS: usize = 20;
/// Categories a bar chart shows; the rest are summed as "(other)".
const TOP: usize = 15;

/// Real and synthetic shares per bin (numbers, dates) or per category, for every column the
/// synthesizer learned; identifiers and skipped columns have none.
pub fn distributions(real: &Table, synthetic: &Table, roles: &[(String, Role)]) -> Vec<Value> {
    roles
        .iter()
        .filter_map(|(name, role)| {
            let (real, synthetic) = (&real.column(name)?.values, &synthetic.column(name)?.values);
            match (role, real, synthetic) {
                (Role::Numerical | Role::Datetime, Values::Numbers(r), Values::Numbers(s)) => {
                    Some(histogram(name, r, s))
                }
                (Role::Categorical, _, _) => Some(categories(name, real, synthetic)),
                _ => None,
            }
        })
        .collect()
}

fn histogram(name: &str, real: &[Option<f64>], synthetic: &[Option<f64>]) -> Value {
    let present = real.iter().flatten().copied();
    let lo = present.clone().fold(f64::INFINITY, f64::min);
    let hi = present.fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.0, 0.0) };
    let width = (hi - lo) / BINS as f64;
    let shares = |values: &[Option<f64>]| {
        let mut counts = [0usize; BINS];
        let mut n = 0;
        for v in values.iter().flatten() {
            let bin = if width > 0.0 {
                (((v - lo) / width).floor().max(0.0) as usize).min(BINS - 1)
            } else {
                0
            };
            counts[bin] += 1;
            n += 1;
        }
        counts
            .iter()
            .map(|&c| c as f64 / n.max(1) as f64)
            .collect::<Vec<_>>()
    };
    json!({
        "column": name, "kind": "histogram", "min": lo, "max": hi,
        "real": shares(real), "synthetic": shares(synthetic),
    })
}

fn categories(name: &str, real: &Values, synthetic: &Values) -> Value {
    let labels = |values: &Values| -> Vec<String> {
        match values {
            Values::Labels(v) => v.iter().flatten().cloned().collect(),
            Values::Numbers(v) => v.iter().flatten().map(|x| x.to_string()).collect(),
        }
    };
    let (real, synthetic) = (labels(real), labels(synthetic));
    let mut counts: std::collections::HashMap<&str, usize> = Default::default();
    for label in &real {
        *counts.entry(label).or_default() += 1;
    }
    let mut top: Vec<(&str, usize)> = counts.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let shown: Vec<&str> = top.iter().take(TOP).map(|(l, _)| *l).collect();
    let shares = |values: &[String]| {
        let mut shares = vec![0.0; shown.len() + 1];
        for label in values {
            let i = shown.iter().position(|s| s == label).unwrap_or(shown.len());
            shares[i] += 1.0;
        }
        shares
            .iter()
            .map(|c| c / values.len().max(1) as f64)
            .collect::<Vec<_>>()
    };
    let mut names: Vec<String> = shown.iter().map(|s| s.to_string()).collect();
    names.push("(other)".into());
    json!({
        "column": name, "kind": "categories", "labels": names,
        "real": shares(&real), "synthetic": shares(&synthetic),
    })
}

const REAL: &str = "#4c72b0";
const SYNTHETIC: &str = "#dd8452";

/// `report.html` from `report.json`.
pub fn html(report: &Value) -> String {
    let mut page = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Synthesis report</title><style>\
         body{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem;color:#222;background:#fff}\
         @media (prefers-color-scheme: dark){body{color:#ddd;background:#181818}}\
         h2{margin-top:2rem}.charts{display:flex;flex-wrap:wrap;gap:1.5rem}\
         figure{margin:0}figcaption{font-weight:600;margin-bottom:.3rem}\
         .legend span{display:inline-block;width:.8rem;height:.8rem;margin:0 .3rem 0 1rem}\
         table{border-collapse:collapse}td,th{padding:.2rem .6rem;text-align:left}\
         </style></head><body><h1>Synthesis report</h1>",
    );
    let quality = &report["quality"];
    page.push_str("<h2>Quality</h2><div class=\"charts\">");
    for (label, key) in [
        ("Overall", "overall"),
        ("Column shapes", "column_shapes"),
        ("Column pair trends", "column_pair_trends"),
    ] {
        gauge(&mut page, label, quality[key].as_f64().unwrap_or(0.0));
    }
    page.push_str("</div>");
    if let Some(rules) = report["constraints"].as_array().filter(|r| !r.is_empty()) {
        let without = report["quality_without_constraints"]["overall"].as_f64();
        let _ = write!(
            page,
            "<p class=\"constraints\">Every row keeps the {} constraint(s); overall quality of \
             the same model without them: {}.</p>",
            rules.len(),
            without.map_or("–".into(), |q| format!("{:.1} %", q * 100.0))
        );
    }
    let rows = &report["rows"];
    let _ = write!(
        page,
        "<p>{} real rows ({} to train, {} held out), {} synthetic rows; synthesizer {}, seed {}.</p>",
        rows["input"], rows["train"], rows["holdout"], rows["generated"],
        escape(report["synthesizer"].as_str().unwrap_or("?")), report["seed"]
    );

    page.push_str(
        "<h2>Columns</h2><p class=\"legend\">Share of rows:<span style=\"background:#4c72b0\"></span>real\
         <span style=\"background:#dd8452\"></span>synthetic</p><div class=\"charts\">",
    );
    let scores = quality["shapes"].as_array().cloned().unwrap_or_default();
    for d in report["distributions"].as_array().into_iter().flatten() {
        let column = d["column"].as_str().unwrap_or("?");
        let score = scores
            .iter()
            .find(|s| s["column"] == column)
            .and_then(|s| s["score"].as_f64());
        chart(&mut page, d, score);
    }
    page.push_str("</div>");

    pairs(&mut page, quality);
    privacy(&mut page, &report["privacy"]);
    page.push_str("</body></html>");
    page
}

fn gauge(page: &mut String, label: &str, score: f64) {
    let width = 200.0 * score.clamp(0.0, 1.0);
    let _ = write!(
        page,
        "<figure data-gauge=\"{label}\"><figcaption>{label}: {:.1} %</figcaption>\
         <svg width=\"200\" height=\"16\" role=\"img\" aria-label=\"{label} {:.1} %\">\
         <rect width=\"200\" height=\"16\" fill=\"#ccc\"/>\
         <rect width=\"{width:.1}\" height=\"16\" fill=\"{REAL}\"/></svg></figure>",
        score * 100.0,
        score * 100.0
    );
}

/// Paired bars: real and synthetic share per bin or category.
fn chart(page: &mut String, d: &Value, score: Option<f64>) {
    let column = escape(d["column"].as_str().unwrap_or("?"));
    let real: Vec<f64> = floats(&d["real"]);
    let synthetic: Vec<f64> = floats(&d["synthetic"]);
    let n = real.len().max(1);
    let top = real
        .iter()
        .chain(&synthetic)
        .fold(0.0f64, |a, &b| a.max(b))
        .max(1e-9);
    let (w, h) = (320.0, 140.0);
    let slot = w / n as f64;
    let score = score.map_or(String::new(), |s| format!(" (shape {:.1} %)", s * 100.0));
    let _ = write!(
        page,
        "<figure data-column=\"{column}\"><figcaption>{column}{score}</figcaption>\
         <svg width=\"{w}\" height=\"{}\" role=\"img\" aria-label=\"{column}: real and synthetic distributions\">",
        h + 30.0
    );
    for (i, (r, s)) in real.iter().zip(&synthetic).enumerate() {
        let x = i as f64 * slot;
        for (j, (share, colour)) in [(r, REAL), (s, SYNTHETIC)].into_iter().enumerate() {
            let bar = h * share / top;
            let _ = write!(
                page,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bar:.1}\" fill=\"{colour}\">\
                 <title>{:.1} %</title></rect>",
                x + j as f64 * slot / 2.0,
                h - bar,
                (slot / 2.0 - 1.0).max(0.5),
                share * 100.0
            );
        }
    }
    let axis = if d["kind"] == "histogram" {
        format!("{} … {}", number(&d["min"]), number(&d["max"]))
    } else {
        let labels: Vec<String> = d["labels"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.as_str())
            .map(escape)
            .collect();
        labels.join(", ")
    };
    let _ = write!(
        page,
        "<text x=\"0\" y=\"{}\" font-size=\"11\" fill=\"currentColor\">{}</text></svg></figure>",
        h + 20.0,
        truncate(&axis, 60)
    );
}

/// Correlation of every continuous pair, real against synthetic, as two rows of coloured
/// cells, with their difference.
fn pairs(page: &mut String, quality: &Value) {
    let pairs: Vec<&Value> = quality["pairs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["real_correlation"].is_number())
        .collect();
    if pairs.is_empty() {
        return;
    }
    page.push_str(
        "<h2>Pair trends</h2><table><tr><th>columns</th><th>real r</th><th>synthetic r</th>\
         <th>difference</th><th>score</th></tr>",
    );
    for p in pairs {
        let (r, s) = (
            p["real_correlation"].as_f64().unwrap_or(0.0),
            p["synthetic_correlation"].as_f64().unwrap_or(0.0),
        );
        let names: Vec<String> = p["columns"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str())
            .map(escape)
            .collect();
        let _ = write!(
            page,
            "<tr data-pair=\"{}\"><td>{}</td>{}{}{}<td>{:.1} %</td></tr>",
            names.join("/"),
            names.join(" × "),
            cell(r),
            cell(s),
            cell(s - r),
            p["score"].as_f64().unwrap_or(0.0) * 100.0
        );
    }
    page.push_str("</table>");
}

/// A value in [-1, 1] as a cell coloured blue (negative) to red (positive), its number shown.
fn cell(v: f64) -> String {
    let v = v.clamp(-1.0, 1.0);
    let (red, blue) = if v >= 0.0 {
        (255, (255.0 * (1.0 - v)) as u8)
    } else {
        ((255.0 * (1.0 + v)) as u8, 255)
    };
    let green = (255.0 * (1.0 - v.abs())) as u8;
    format!("<td style=\"background:rgb({red},{green},{blue});color:#000\">{v:+.2}</td>")
}

fn privacy(page: &mut String, privacy: &Value) {
    page.push_str("<h2>Privacy</h2><table>");
    for (label, key) in [
        (
            "distance to closest real record, synthetic rows",
            "dcr_synthetic_to_train",
        ),
        (
            "distance to closest real record, held-out real rows (baseline)",
            "dcr_holdout_to_train",
        ),
    ] {
        let d = &privacy[key];
        let _ = write!(
            page,
            "<tr><th>{label}</th><td>median {}, 5th percentile {}</td></tr>",
            number(&d["median"]),
            number(&d["p05"])
        );
    }
    let _ = write!(
        page,
        "<tr><th>synthetic rows equal to a real one</th><td>{:.2} %</td></tr>",
        privacy["exact_match_rate"].as_f64().unwrap_or(0.0) * 100.0
    );
    if let Some(attack) = privacy["membership_inference"].as_object() {
        let _ = write!(
            page,
            "<tr><th>membership inference (distance attack, AUC; 0.5 is a coin toss)</th>\
             <td>{} (advantage {})</td></tr>",
            number(&attack["auc"]),
            number(&attack["advantage"])
        );
    }
    let budget = &privacy["budget"];
    let epsilon = match privacy["epsilon_spent"].as_f64() {
        Some(e) => format!(
            "{e} (differential privacy, δ = {}): {}",
            budget["delta"],
            escape(budget["mechanism"].as_str().unwrap_or(""))
        ),
        None => "none: not differentially private".into(),
    };
    let _ = write!(page, "<tr><th>ε spent</th><td>{epsilon}</td></tr></table>");
    if let Some(spent) = budget["spent"].as_array() {
        page.push_str(
            "<table><tr><th>release</th><th>ε</th><th>sensitivity</th><th>noise scale</th></tr>",
        );
        for part in spent {
            let _ = write!(
                page,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(part["what"].as_str().unwrap_or("?")),
                number(&part["epsilon"]),
                part["sensitivity"],
                number(&part["noise_scale"])
            );
        }
        page.push_str("</table>");
    }
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|x| x.as_f64().unwrap_or(0.0))
        .collect()
}

fn number(v: &Value) -> String {
    v.as_f64().map_or("–".into(), |x| format!("{x:.4}"))
}

fn truncate(text: &str, chars: usize) -> String {
    if text.chars().count() <= chars {
        return text.to_owned();
    }
    text.chars().take(chars).collect::<String>() + "…"
}

/// Column names and labels come from the tenant's file: escaped into the page.
fn escape(text: &str) -> String {
    html_escape::encode_double_quoted_attribute(text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthesis::table::Column;

    fn numbers(name: &str, values: &[f64]) -> Column {
        Column {
            name: name.into(),
            dtype: polars::prelude::DataType::Float64,
            values: Values::Numbers(values.iter().map(|v| Some(*v)).collect()),
        }
    }

    #[test]
    fn shares_sum_to_one_and_the_page_has_a_chart_per_column_escaped() {
        let real = Table {
            columns: vec![
                numbers("x", &[1.0, 2.0, 3.0, 4.0]),
                Column {
                    name: "<b>band</b>".into(),
                    dtype: polars::prelude::DataType::String,
                    values: Values::Labels(
                        ["a", "a", "b", "<script>"]
                            .iter()
                            .map(|s| Some(s.to_string()))
                            .collect(),
                    ),
                },
            ],
        };
        let synthetic = real.clone();
        let roles = vec![
            ("x".to_string(), Role::Numerical),
            ("<b>band</b>".to_string(), Role::Categorical),
        ];
        let d = distributions(&real, &synthetic, &roles);
        assert_eq!(d.len(), 2);
        for dist in &d {
            let sum: f64 = floats(&dist["real"]).iter().sum();
            assert!((sum - 1.0).abs() < 1e-9, "{dist}");
        }
        let report = json!({"quality": {"overall": 0.9, "shapes": [], "pairs": []},
                            "rows": {}, "privacy": {}, "distributions": d});
        let page = html(&report);
        assert_eq!(page.matches("<figure data-column=").count(), 2);
        assert!(
            !page.contains("<script>") && !page.contains("<b>band"),
            "escaped"
        );
        assert!(!page.contains("http"), "nothing fetched from anywhere");
        assert!(!page.contains("class=\"constraints\""));
        let constrained = json!({"quality": {"overall": 0.9}, "rows": {}, "privacy": {},
                                 "constraints": [{"type": "positive", "column": "x"}],
                                 "quality_without_constraints": {"overall": 0.8}});
        assert!(html(&constrained).contains(
            "1 constraint(s); overall quality of the same model \
                                             without them: 80.0 %"
        ));
    }
}
