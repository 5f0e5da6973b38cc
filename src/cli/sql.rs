//! `patchgd sql`: one query, or the interactive prompt (docs/sql.md).

use std::path::PathBuf;

use anyhow::Result;
use patchgd::pipeline::Definition;
use patchgd::storage::{Location, StoreOptions};

#[derive(clap::Args)]
pub struct SqlArgs {
    /// The query; omit it for the interactive prompt.
    pub query: Option<String>,
    /// A pipeline file: its images become `images` and `patches` (with its patch settings),
    /// and its output directory's results `metrics`, `predictions`, `errors`, `latents`.
    #[arg(long)]
    pub pipeline: Option<PathBuf>,
    /// Images URL for `images` and `patches` (instead of --pipeline).
    #[arg(long)]
    pub images: Option<String>,
    /// Labels table (CSV or Parquet) for --images.
    #[arg(long)]
    pub labels: Option<String>,
    /// Patch size for --images.
    #[arg(long, default_value_t = 256)]
    pub patch: usize,
    /// Pyramid level for --images.
    #[arg(long, default_value_t = 0)]
    pub level: usize,
    /// Channels for --images: 1 (grey) or 3 (RGB).
    #[arg(long, default_value_t = 3)]
    pub channels: usize,
    /// A run's output directory (instead of the pipeline's).
    #[arg(long)]
    pub run: Option<String>,
    /// Object store setting (repeatable; credentials come from the environment).
    #[arg(long = "storage", value_name = "KEY=VALUE")]
    pub storage: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: patchgd::sql::shell::Format,
    /// Write the result to this file instead of stdout.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Run on a Ballista cluster: its scheduler as df://HOST:PORT (docs/cluster.md).
    #[arg(long, value_name = "df://HOST:PORT")]
    pub cluster: Option<String>,
    /// Partitions per scan; default: the cores here (on a cluster, set it to the tasks the
    /// executors run at once).
    #[arg(long)]
    pub partitions: Option<usize>,
}

pub fn run(args: SqlArgs) -> Result<()> {
    use patchgd::sql::{DataSet, Sources, register, session_with_partitions, shell};
    let mut storage = StoreOptions::from_pairs(&args.storage)?;
    let mut sources = Sources::default();
    if let Some(path) = &args.pipeline {
        let def = Definition::from_file(path)?;
        if args.storage.is_empty() {
            storage = def.storage.clone();
        }
        sources.data = Some(def.data_set());
        // The run tables exist once the pipeline has run.
        let out = Location::parse_with(&def.output, &def.storage)?;
        let rt = tokio::runtime::Runtime::new()?;
        if rt.block_on(out.head(&out.path("metrics.parquet"))).is_ok() {
            sources.run = Some(def.output.clone());
        }
    }
    if let Some(images) = &args.images {
        let mut data = DataSet::new(images, args.patch);
        data.labels = args.labels.clone();
        data.storage = storage.clone();
        data.stream.level = args.level;
        data.stream.channels = args.channels;
        sources.data = Some(data);
    }
    if let Some(run) = &args.run {
        sources.run = Some(run.clone());
    }
    sources.storage = storage;
    let rt = tokio::runtime::Runtime::new()?;
    let partitions = args
        .partitions
        .unwrap_or_else(patchgd::sql::default_partitions);
    let ctx = match &args.cluster {
        None => session_with_partitions(partitions),
        Some(url) => {
            // Ballista's client warnings (a retried fetch, a lost executor) are worth seeing.
            super::cluster::show_ballista_log(log::LevelFilter::Warn);
            rt.block_on(patchgd::sql::cluster::connect(url, partitions))?
        }
    };
    let reported = rt.block_on(register(&ctx, &sources))?;
    let wants_latents = args.query.as_ref().is_none_or(|q| q.contains("latents"));
    if let Some(run) = &sources.run
        && wants_latents
        && !ctx.table_exist("latents")?
    {
        eprintln!("note: no latents table: run '{run}' has no complete checkpoint");
    }
    let out = shell::Output {
        format: args.format,
        file: args.output.clone(),
    };
    match &args.query {
        Some(q) => {
            rt.block_on(shell::run_one(&ctx, &reported, q, &out))?;
        }
        None => {
            let mut tables: Vec<&str> = vec![];
            if sources.data.is_some() {
                tables.extend(["images", "patches"]);
            }
            if sources.run.is_some() {
                tables.extend(["metrics", "predictions", "errors", "heatmaps", "latents"]);
            }
            let banner = format!(
                "patchgd sql: tables {}",
                if tables.is_empty() {
                    "none (use --pipeline, --images or --run; table functions work)".to_string()
                } else {
                    tables.join(", ")
                }
            );
            shell::interactive(&rt, &ctx, &reported, &banner)?;
        }
    }
    Ok(())
}
