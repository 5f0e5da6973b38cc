//! The `patchgd` command line: argument parsing and dispatch. Each subcommand lives in
//! `src/cli/`; the work itself is the library's.

/// The command line's own modules (the library has none of this).
mod cli {
    pub mod bench;
    pub mod cluster;
    pub mod inspect;
    pub mod predict;
    pub mod progress;
    pub mod run;
    pub mod sql;
    pub mod synth;
}

use anyhow::Result;
use clap::{Parser, Subcommand};

use cli::synth::SynthKind;

#[derive(Parser)]
#[command(
    name = "patchgd",
    version,
    about = "Patch Gradient Descent on very large images"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline definition (YAML): train, evaluate, and write the results to its output.
    Run(cli::run::RunArgs),
    /// Apply a trained model (a run's output or checkpoint) to images, labelled or not: writes
    /// predictions.parquet, errors.parquet, summary.json, and metrics.json with labels.
    Predict(cli::predict::PredictArgs),
    /// Generate a data set.
    Synth {
        #[command(subcommand)]
        kind: SynthKind,
    },
    /// Describe image objects: size, levels, tiles, compression, channels, patch counts.
    Inspect(cli::inspect::InspectArgs),
    /// Measure the performance targets (docs/benchmarks.md): pipeline efficiency against
    /// the in-memory ceiling, peak memory by image size, PatchGD vs GD at one memory budget.
    Bench(cli::bench::BenchArgs),
    /// Query images, patches, latents and run results with SQL (docs/sql.md). Without a query:
    /// an interactive prompt with history.
    Sql(cli::sql::SqlArgs),
    /// Start a Ballista scheduler that runs patchgd's SQL on executors (docs/cluster.md).
    Scheduler(cli::cluster::SchedulerArgs),
    /// Start a Ballista executor with patchgd's tables; it registers with a scheduler.
    Executor(cli::cluster::ExecutorArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Under mpirun or srun, `run` is one rank of a data-parallel run (docs/distributed.md), and
    // `bench --only allreduce` measures across the ranks.
    let group = match &cli.command {
        Command::Run(_) | Command::Bench(_) => patchgd::dist::Group::from_environment()?,
        _ => patchgd::dist::Group::single(),
    };
    // The library reports through `tracing`: warnings and notes go to stderr; from rank 0 only,
    // when there are several (the others report errors, prefixed with their rank).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_max_level(if group.is_root() {
            tracing::Level::INFO
        } else {
            tracing::Level::ERROR
        })
        .init();
    match cli.command {
        Command::Run(args) => {
            let (rank, ranks) = (group.rank(), group.size());
            cli::run::run(&args, group).map_err(|e| {
                if ranks > 1 {
                    e.context(format!("rank {rank} of {ranks}"))
                } else {
                    e
                }
            })
        }
        Command::Synth {
            kind: SynthKind::Ultramnist(args),
        } => cli::synth::run(args),
        Command::Inspect(args) => cli::inspect::run(args),
        Command::Predict(args) => cli::predict::run(args),
        Command::Sql(args) => cli::sql::run(args),
        Command::Bench(args) => cli::bench::run(args, group),
        Command::Scheduler(args) => cli::cluster::scheduler(args),
        Command::Executor(args) => cli::cluster::executor(args),
    }
}
