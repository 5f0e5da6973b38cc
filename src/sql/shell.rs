//! `patchgd sql`: one query, or an interactive prompt with history; results as a table on a
//! terminal, or CSV, JSON lines or Parquet to a file or stdout.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::prelude::SessionContext;

use super::{Reported, query};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A table (the default).
    Table,
    Csv,
    /// One JSON object per row (JSON lines).
    Json,
    Parquet,
}

/// Where results go.
#[derive(Clone, Debug)]
pub struct Output {
    pub format: Format,
    /// A file, or stdout when `None`.
    pub file: Option<PathBuf>,
}

/// Run one statement and write its result. Image failures met by the scans go to stderr.
pub async fn run_one(
    ctx: &SessionContext,
    reported: &Reported,
    sql: &str,
    out: &Output,
) -> Result<usize, DataFusionError> {
    let df = query(ctx, sql).await?;
    let schema = df.schema().as_arrow().clone();
    let batches = df.collect().await?;
    report_failures(reported);
    let rows = batches.iter().map(|b| b.num_rows()).sum();
    let bytes = render(&schema, &batches, out.format)?;
    match &out.file {
        Some(path) => std::fs::write(path, bytes).map_err(|e| {
            DataFusionError::Execution(format!("writing '{}': {e}", path.display()))
        })?,
        None => {
            if out.format == Format::Parquet && std::io::stdout().is_terminal() {
                return Err(DataFusionError::Execution(
                    "--format parquet writes binary: give --output FILE or redirect stdout".into(),
                ));
            }
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&bytes)?;
            stdout.flush()?;
        }
    }
    Ok(rows)
}

fn report_failures(reported: &Reported) {
    let failures = reported.take();
    if failures.is_empty() {
        return;
    }
    eprintln!(
        "warning: {} image{} could not be read (not in the result):",
        failures.len(),
        if failures.len() == 1 { "" } else { "s" }
    );
    for f in failures.iter().take(20) {
        eprintln!("  {} ({}) at {}: {}", f.image_id, f.url, f.stage, f.message);
    }
    if failures.len() > 20 {
        eprintln!("  … and {} more", failures.len() - 20);
    }
}

/// A result in `format`.
pub fn render(
    schema: &arrow::datatypes::Schema,
    batches: &[RecordBatch],
    format: Format,
) -> Result<Vec<u8>, DataFusionError> {
    let mut buf = Vec::new();
    match format {
        Format::Table => {
            let table = arrow::util::pretty::pretty_format_batches(batches)?;
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            if batches.is_empty() {
                let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                writeln!(buf, "({})", names.join(", "))?;
            } else {
                writeln!(buf, "{table}")?;
            }
            writeln!(buf, "{rows} row{}", if rows == 1 { "" } else { "s" })?;
        }
        Format::Csv => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut buf);
            for b in batches {
                w.write(b)?;
            }
        }
        Format::Json => {
            let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
        }
        Format::Parquet => {
            let mut w = parquet::arrow::ArrowWriter::try_new(
                &mut buf,
                std::sync::Arc::new(schema.clone()),
                None,
            )?;
            for b in batches {
                w.write(b)?;
            }
            w.close()?;
        }
    }
    Ok(buf)
}

const HELP: &str = "\
Type a query ending with ';' (it may span lines). Tables: SHOW TABLES; columns: DESCRIBE patches;
Commands: \\q (or quit, exit) leaves, \\d lists tables, \\h shows this help.
Table functions: images('URL'), patches('URL', 256), latents('RUN_DIR'). Read-only.";

/// Where the prompt keeps its history: $PATCHGD_HISTORY, else ~/.patchgd_history.
pub fn history_file() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PATCHGD_HISTORY") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".patchgd_history"))
}

/// The interactive prompt: queries end with ';'; results print as tables; errors do not end it.
pub fn interactive(
    rt: &tokio::runtime::Runtime,
    ctx: &SessionContext,
    reported: &Reported,
    banner: &str,
) -> anyhow::Result<()> {
    use rustyline::error::ReadlineError;
    let mut editor = rustyline::DefaultEditor::new()?;
    let history = history_file();
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    println!("{banner}\n\\h for help, \\q to quit.");
    let out = Output {
        format: Format::Table,
        file: None,
    };
    let mut pending = String::new();
    loop {
        let prompt = if pending.is_empty() {
            "patchgd> "
        } else {
            "     ..> "
        };
        let line = match editor.readline(prompt) {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => {
                pending.clear();
                continue;
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let trimmed = line.trim();
        if pending.is_empty() {
            match trimmed {
                "" => continue,
                "\\q" | "quit" | "exit" | "quit;" | "exit;" => break,
                "\\h" | "help" | "\\?" => {
                    println!("{HELP}");
                    continue;
                }
                "\\d" => {
                    let _ = editor.add_history_entry(trimmed);
                    if let Err(e) = rt.block_on(run_one(ctx, reported, "SHOW TABLES", &out)) {
                        eprintln!("error: {e}");
                    }
                    continue;
                }
                _ => {}
            }
        }
        pending.push_str(&line);
        pending.push('\n');
        if !trimmed.ends_with(';') {
            continue;
        }
        let statement = std::mem::take(&mut pending);
        let _ = editor.add_history_entry(statement.trim());
        if let Some(h) = &history {
            let _ = editor.save_history(h);
        }
        let sql = statement.trim().trim_end_matches(';');
        if let Err(e) = rt.block_on(run_one(ctx, reported, sql, &out)) {
            eprintln!("error: {e}");
        }
    }
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    Ok(())
}
