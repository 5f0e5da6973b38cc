//! `patchgd scheduler` and `patchgd executor`: a Ballista cluster that runs patchgd's SQL
//! (docs/cluster.md).

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use patchgd::sql::cluster::{
    ExecutorOptions, SchedulerOptions, run_executor, run_scheduler, socket_address,
};

#[derive(Args)]
pub struct SchedulerArgs {
    /// Where clients and executors reach it (HOST:PORT).
    #[arg(long, default_value = "127.0.0.1:50050")]
    pub bind: String,
    /// Seconds without a heartbeat after which an executor is lost and its tasks run elsewhere.
    #[arg(long, default_value_t = 30)]
    pub executor_timeout: u64,
}

#[derive(Args)]
pub struct ExecutorArgs {
    /// The scheduler (HOST:PORT).
    #[arg(long, default_value = "127.0.0.1:50050")]
    pub scheduler: String,
    /// Where it serves results (Arrow Flight), HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub bind: String,
    /// Its gRPC port; default: the --bind port + 1.
    #[arg(long, default_value_t = 0)]
    pub grpc_port: u16,
    /// The host name other machines reach it by; default: the --bind host.
    #[arg(long)]
    pub external_host: Option<String>,
    /// Tasks at once; default: the cores.
    #[arg(long)]
    pub concurrent_tasks: Option<usize>,
    /// Directory for shuffle files; default: a temporary one.
    #[arg(long)]
    pub work_dir: Option<String>,
    /// Seconds between heartbeats to the scheduler.
    #[arg(long, default_value_t = 5)]
    pub heartbeat: u64,
}

/// Ballista's own log lines (`log` crate: jobs, tasks, lost executors) on stderr, beside
/// patchgd's (`tracing`).
struct BallistaLog;

impl log::Log for BallistaLog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "{:>5} {}: {}",
                record.level(),
                record.target(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

/// Print Ballista's log lines up to `level` (once per process).
pub fn show_ballista_log(level: log::LevelFilter) {
    if log::set_logger(&BallistaLog).is_ok() {
        log::set_max_level(level);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    show_ballista_log(log::LevelFilter::Info);
    // Ballista's planners recurse deeply on large plans: its own binaries use 32 MiB stacks.
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(32 << 20)
        .build()?)
}

pub fn scheduler(args: SchedulerArgs) -> Result<()> {
    let options = SchedulerOptions {
        bind: socket_address(&args.bind)?,
        executor_timeout: Duration::from_secs(args.executor_timeout),
    };
    runtime()?.block_on(run_scheduler(&options))?;
    Ok(())
}

pub fn executor(args: ExecutorArgs) -> Result<()> {
    let mut options = ExecutorOptions {
        scheduler: args.scheduler,
        bind: socket_address(&args.bind)?,
        grpc_port: args.grpc_port,
        external_host: args.external_host,
        work_dir: args.work_dir,
        heartbeat: Duration::from_secs(args.heartbeat),
        ..Default::default()
    };
    if let Some(n) = args.concurrent_tasks {
        options.concurrent_tasks = n;
    }
    runtime()?.block_on(run_executor(&options))?;
    Ok(())
}
