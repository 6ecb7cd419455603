//! `conveyor patch preflight|dry-run|execute|rollback`: the dashboard's patch review in a
//! terminal, with its confirmation rules. Execute runs a dry run first and repeats its row count
//! and the risk; it runs only once confirmed, and a high risk is confirmed only by the table's
//! name, typed or given with `--confirm-table` (`--yes` alone never runs a high-risk patch).

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::{io::Write, process::ExitCode};

use crate::{listed, print_json, strings, table::Table, Client};

#[derive(Args)]
pub struct Statement {
    /// One UPDATE or DELETE of one table.
    sql: String,
    /// A registered connection's id; the default target database when absent.
    #[arg(long)]
    connection: Option<String>,
    /// Rows per batch; adaptive when absent.
    #[arg(long)]
    batch_size: Option<u32>,
    /// Sleep between batches, in milliseconds.
    #[arg(long)]
    pause_ms: Option<u64>,
    /// Fail before the batch that would change more rows than this.
    #[arg(long)]
    max_rows: Option<u64>,
    /// Let a statement without a row-dependent WHERE clause through.
    #[arg(long)]
    allow_full_table: bool,
}

impl Statement {
    fn payload(&self, mode: &str) -> Value {
        let mut payload = json!({"sql": self.sql, "mode": mode});
        if let Some(c) = &self.connection {
            payload["connection_id"] = json!(c);
        }
        if let Some(n) = self.batch_size {
            payload["batch_size"] = json!(n);
        }
        if let Some(n) = self.pause_ms {
            payload["pause_ms"] = json!(n);
        }
        if let Some(n) = self.max_rows {
            payload["max_rows"] = json!(n);
        }
        if self.allow_full_table {
            payload["allow_full_table"] = json!(true);
        }
        payload
    }
}

#[derive(Subcommand)]
pub enum PatchCommand {
    /// The checks a patch passes and its risk, without running it.
    Preflight(Statement),
    /// Runs the statement in a transaction that is rolled back: the exact row count and the
    /// first rows before and after.
    DryRun(Statement),
    /// A dry run, then, once confirmed, the patch in batches with a snapshot of every changed
    /// row (exit 0 succeeded, 1 failed or cancelled, 2 not confirmed or refused).
    Execute {
        #[command(flatten)]
        statement: Statement,
        /// Confirm without asking (scripts). A high-risk patch still needs --confirm-table.
        #[arg(long)]
        yes: bool,
        /// The table's name, which confirms a high-risk patch without asking.
        #[arg(long, value_name = "TABLE")]
        confirm_table: Option<String>,
    },
    /// Restores the rows a patch changed from its snapshot (rows changed since are left, unless
    /// --force).
    Rollback {
        /// The patch job's id.
        job: String,
        #[arg(long)]
        force: bool,
    },
}

pub async fn patch(client: &Client, command: PatchCommand) -> anyhow::Result<ExitCode> {
    match command {
        PatchCommand::Preflight(statement) => {
            let assessment = client
                .send(
                    client
                        .post("/v1/patches/preflight")
                        .json(&statement.payload("dry_run")),
                )
                .await?;
            if client.json {
                print_json(&assessment);
            } else {
                put!("{}", preflight_text(&assessment));
            }
            Ok(ExitCode::SUCCESS)
        }
        PatchCommand::DryRun(statement) => {
            let job = dry_run(client, &statement).await?;
            if client.json {
                print_json(&job);
            }
            Ok(outcome(&job))
        }
        PatchCommand::Execute {
            statement,
            yes,
            confirm_table,
        } => {
            let dry = dry_run(client, &statement).await?;
            if dry["status"] != "succeeded" {
                if client.json {
                    print_json(&dry);
                }
                return Ok(outcome(&dry));
            }
            let result = &dry["result"];
            let assessment = &result["preflight"];
            let rows = result["rows"].as_u64().unwrap_or(0);
            err!("{}", confirmation(assessment, rows));
            confirm(assessment, yes, confirm_table.as_deref())?;
            let job = submit(client, statement.payload("execute")).await?;
            let id = job["id"].as_str().context("the API returned no job id")?;
            err!("executing: job {id}");
            let done = client
                .follow(id, |message| {
                    let data = &message.data;
                    if message.event == "log" && data["data"]["batches"].is_number() {
                        err!(
                            "  batch {:>4}  {:>9} rows  longest lock {:.1} ms",
                            data["data"]["batches"],
                            data["data"]["rows"],
                            data["data"]["longest_lock_ms"].as_f64().unwrap_or(0.0)
                        );
                    }
                })
                .await?;
            if client.json {
                print_json(&done);
            } else {
                put!("{}", executed_text(&done));
            }
            Ok(outcome(&done))
        }
        PatchCommand::Rollback { job, force } => {
            let submitted = submit_kind(
                client,
                "patch_rollback",
                json!({"patch_job_id": job, "force": force}),
            )
            .await?;
            let id = submitted["id"]
                .as_str()
                .context("the API returned no job id")?;
            err!("rolling back patch {job}: job {id}");
            let done = client.follow(id, |_| {}).await?;
            if client.json {
                print_json(&done);
            } else if done["status"] == "succeeded" {
                let r = &done["result"];
                out!(
                    "rolled back {}: {} rows restored, {} left as changed since",
                    r["table"].as_str().unwrap_or("?"),
                    r["rows_restored"],
                    r["conflicts"]
                );
            } else {
                out!(
                    "rollback {}: {}",
                    done["status"].as_str().unwrap_or("?"),
                    done["error"].as_str().unwrap_or("")
                );
            }
            Ok(outcome(&done))
        }
    }
}

fn outcome(job: &Value) -> ExitCode {
    if job["status"] == "succeeded" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn submit(client: &Client, payload: Value) -> anyhow::Result<Value> {
    submit_kind(client, "patch", payload).await
}

async fn submit_kind(client: &Client, kind: &str, payload: Value) -> anyhow::Result<Value> {
    client
        .send(
            client
                .post("/v1/jobs")
                .json(&json!({"kind": kind, "payload": payload})),
        )
        .await
}

/// Submits a dry run and follows it; prints its preflight and diff (text mode). Returns the
/// finished job.
async fn dry_run(client: &Client, statement: &Statement) -> anyhow::Result<Value> {
    let job = submit(client, statement.payload("dry_run")).await?;
    let id = job["id"].as_str().context("the API returned no job id")?;
    err!("dry run: job {id}");
    let done = client.follow(id, |_| {}).await?;
    if done["status"] != "succeeded" {
        err!(
            "the dry run {}: {}",
            done["status"].as_str().unwrap_or("?"),
            done["error"].as_str().unwrap_or("")
        );
    } else if !client.json {
        put!("{}", preflight_text(&done["result"]["preflight"]));
        put!("{}", diff_text(&done["result"]));
    }
    Ok(done)
}

/// Colour is not the only signal anywhere: the risk is an icon and a word.
fn risk(assessment: &Value) -> String {
    let word = assessment["risk"].as_str().unwrap_or("?");
    let icon = match word {
        "low" => "✓",
        "medium" => "!",
        "high" => "✖",
        _ => "?",
    };
    format!("{icon} {word}")
}

fn preflight_text(a: &Value) -> String {
    let key = strings(&a["key"]);
    let mut out = format!(
        "risk       {} risk\ntable      {}\noperation  {}\nkey        {} ({})\nestimated  {:.0} of about {:.0} rows (planner's estimate)\n",
        risk(a),
        a["table"].as_str().unwrap_or("?"),
        a["operation"].as_str().unwrap_or("?"),
        key.join(", "),
        a["key_source"].as_str().unwrap_or("?"),
        a["estimated_rows"].as_f64().unwrap_or(0.0),
        a["table_rows"].as_f64().unwrap_or(0.0),
    );
    for reason in a["reasons"].as_array().into_iter().flatten() {
        out.push_str(&format!("  - {}\n", reason.as_str().unwrap_or("")));
    }
    out.push_str(&format!(
        "statement  {}\n",
        a["statement"].as_str().unwrap_or("?")
    ));
    out
}

/// The dry run's sample: a row per sampled row, its key, then each changed column as
/// `before → after`; deleted rows say so.
fn diff_text(result: &Value) -> String {
    let sample = result["sample"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let mut out = format!("\n{} rows would change\n", result["rows"]);
    let Some(first) = sample.first() else {
        return out;
    };
    let keys: Vec<String> = first["key"]
        .as_object()
        .map(|k| k.keys().cloned().collect())
        .unwrap_or_default();
    let mut changed: Vec<String> = Vec::new();
    for row in sample {
        for column in row["changes"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|c| c.0)
        {
            if !keys.contains(column) && !changed.contains(column) {
                changed.push(column.clone());
            }
        }
    }
    let header: Vec<&str> = keys
        .iter()
        .chain(&changed)
        .map(String::as_str)
        .chain(["ROW"])
        .collect();
    let mut table = Table::new(&header, &[]);
    for row in sample {
        let mut cells: Vec<String> = keys.iter().map(|k| row["key"][k].to_string()).collect();
        for column in &changed {
            let change = &row["changes"][column];
            cells.push(if change.is_object() {
                format!("{} → {}", change["before"], change["after"])
            } else {
                String::new()
            });
        }
        cells.push(if row["deleted"] == true {
            "deleted".into()
        } else {
            "updated".into()
        });
        table.row(cells);
    }
    out.push_str(&table.render());
    out
}

/// What the confirmation repeats: the row count, the table, the risk and its reasons.
fn confirmation(a: &Value, rows: u64) -> String {
    let verb = if a["operation"] == "delete" {
        "delete"
    } else {
        "update"
    };
    let reasons = listed("", &strings(&a["reasons"]), "; ");
    format!(
        "\nThis will {verb} {rows} rows of {}. Risk: {}{reasons}.",
        a["table"].as_str().unwrap_or("?"),
        risk(a)
    )
}

/// The table's own name, as a person types it: `"t_1"."orders"` -> `orders`.
fn bare_table(qualified: &str) -> String {
    // The parts between dots outside quotes; the last one, unquoted.
    let mut parts = vec![String::new()];
    let mut quoted = false;
    let mut chars = qualified.chars().peekable();
    while let Some(c) = chars.next() {
        let part = parts.last_mut().expect("one part at least");
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                part.push('"');
            }
            '"' => quoted = !quoted,
            '.' if !quoted => parts.push(String::new()),
            c => part.push(c),
        }
    }
    parts.pop().unwrap_or_default()
}

fn names_table(typed: &str, qualified: &str) -> bool {
    let typed = typed.trim();
    typed == bare_table(qualified) || typed == qualified
}

/// Asks on standard input, unless the flags already confirm. High risk: the table's name,
/// typed or given. Otherwise `y`.
fn confirm(a: &Value, yes: bool, confirm_table: Option<&str>) -> anyhow::Result<()> {
    let table = a["table"].as_str().unwrap_or("?");
    let high = a["risk"] == "high";
    if let Some(typed) = confirm_table {
        anyhow::ensure!(
            names_table(typed, table),
            "not confirmed: --confirm-table {typed:?} does not name {}",
            bare_table(table)
        );
        return Ok(());
    }
    if yes && !high {
        return Ok(());
    }
    if yes {
        anyhow::bail!(
            "not confirmed: a high-risk patch needs the table's name: --confirm-table {}",
            bare_table(table)
        );
    }
    let prompt = if high {
        format!("Type the table name ({}) to confirm: ", bare_table(table))
    } else {
        "Run it? [y/N] ".to_owned()
    };
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .context("reading the confirmation")?;
    let confirmed = if high {
        names_table(&answer, table)
    } else {
        matches!(answer.trim().to_lowercase().as_str(), "y" | "yes")
    };
    anyhow::ensure!(confirmed, "not confirmed: nothing was changed");
    Ok(())
}

fn executed_text(job: &Value) -> String {
    let id = job["id"].as_str().unwrap_or("?");
    if job["status"] != "succeeded" {
        return format!(
            "the patch {}: {}\n",
            job["status"].as_str().unwrap_or("?"),
            job["error"].as_str().unwrap_or("")
        );
    }
    let r = &job["result"];
    let mut out = format!(
        "patched {}: {} rows in {} batches, longest lock {:.1} ms\n",
        r["table"].as_str().unwrap_or("?"),
        r["rows"],
        r["batches"],
        r["longest_lock_ms"].as_f64().unwrap_or(0.0)
    );
    for s in r["snapshots"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "snapshot {}: {} rows, until {}\n",
            s["table"].as_str().unwrap_or("?"),
            s["rows"],
            s["expires_at"].as_str().unwrap_or("?")
        ));
    }
    out.push_str(&format!("roll back with: conveyor patch rollback {id}\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_is_named_bare_or_qualified() {
        assert_eq!(bare_table(r#""t_1"."orders""#), "orders");
        assert_eq!(bare_table(r#""t_1"."or""ders""#), r#"or"ders"#);
        assert_eq!(bare_table("public.orders"), "orders");
        assert!(names_table(" orders\n", r#""t_1"."orders""#));
        assert!(names_table(r#""t_1"."orders""#, r#""t_1"."orders""#));
        assert!(!names_table("order", r#""t_1"."orders""#));
    }

    #[test]
    fn yes_alone_never_confirms_a_high_risk() {
        let high = json!({"risk": "high", "table": "\"t_1\".\"accounts\""});
        let low = json!({"risk": "low", "table": "\"t_1\".\"accounts\""});
        assert!(confirm(&low, true, None).is_ok());
        let refused = confirm(&high, true, None).unwrap_err().to_string();
        assert!(refused.contains("--confirm-table accounts"), "{refused}");
        assert!(confirm(&high, true, Some("accounts")).is_ok());
        assert!(confirm(&high, false, Some("account")).is_err());
    }
}
