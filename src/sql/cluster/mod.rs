//! SQL on an Apache Ballista cluster: a scheduler and executors that know patchgd's tables, and
//! a client session that sends queries to them (docs/cluster.md).
//!
//! The client plans a query as the local session does (its tables and table functions are
//! registered the same way, by [`crate::sql::register`]) and sends the logical plan to the
//! scheduler through [`codec::LogicalCodec`]. The scheduler lists the images once, plans the
//! scans' partitions and sends each task's plan to an executor through
//! [`codec::PhysicalCodec`]; executors read the images. A stock Ballista scheduler or executor
//! does not have these codecs and cannot run patchgd's tables.

pub mod codec;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use ballista::extension::{SessionConfigExt, SessionContextExt};
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::start_server;
use datafusion::error::DataFusionError;
use datafusion::execution::SessionStateBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};

/// Errors of the cluster's processes and of connecting to one.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("bad address '{address}': {reason}")]
    Address { address: String, reason: String },
    #[error("'{url}' is not a cluster address: expected df://HOST:PORT (a patchgd scheduler)")]
    NotACluster { url: String },
    #[error("no Ballista scheduler answers at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("Ballista: {0}")]
    Ballista(#[from] ballista_core::error::BallistaError),
    #[error(transparent)]
    DataFusion(#[from] DataFusionError),
}

/// How a scheduler runs.
#[derive(Clone, Debug)]
pub struct SchedulerOptions {
    /// Where it listens for clients and executors (gRPC).
    pub bind: SocketAddr,
    /// An executor that has not sent a heartbeat for this long is taken as lost: its tasks run
    /// again elsewhere.
    pub executor_timeout: Duration,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:50050".parse().unwrap(),
            executor_timeout: Duration::from_secs(30),
        }
    }
}

/// How an executor runs.
#[derive(Clone, Debug)]
pub struct ExecutorOptions {
    /// The scheduler's `HOST:PORT`.
    pub scheduler: String,
    /// Where it serves its results to other executors and clients (Arrow Flight).
    pub bind: SocketAddr,
    /// Its gRPC port (tasks pushed by the scheduler); 0 = the Flight port + 1.
    pub grpc_port: u16,
    /// The name other machines reach it by; default: the bind address.
    pub external_host: Option<String>,
    /// Tasks run at once; default: the cores.
    pub concurrent_tasks: usize,
    /// Where shuffle files go; default: a temporary directory.
    pub work_dir: Option<String>,
    /// How often it tells the scheduler it is alive.
    pub heartbeat: Duration,
}

impl Default for ExecutorOptions {
    fn default() -> Self {
        Self {
            scheduler: "127.0.0.1:50050".into(),
            bind: "127.0.0.1:50051".parse().unwrap(),
            grpc_port: 0,
            external_host: None,
            concurrent_tasks: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            work_dir: None,
            heartbeat: Duration::from_secs(5),
        }
    }
}

/// `HOST:PORT` resolved to one socket address.
pub fn socket_address(address: &str) -> Result<SocketAddr, ClusterError> {
    let bad = |reason: String| ClusterError::Address {
        address: address.to_string(),
        reason,
    };
    address
        .to_socket_addrs()
        .map_err(|e| bad(format!("{e} (expected HOST:PORT)")))?
        .next()
        .ok_or_else(|| bad("it resolves to no address".into()))
}

/// Run a scheduler with patchgd's codecs until the process ends.
pub async fn run_scheduler(options: &SchedulerOptions) -> Result<(), ClusterError> {
    let timeout = options.executor_timeout.as_secs().max(1);
    let config = SchedulerConfig {
        bind_host: options.bind.ip().to_string(),
        bind_port: options.bind.port(),
        external_host: options.bind.ip().to_string(),
        executor_timeout_seconds: timeout,
        // Look for lost executors often enough that a lost one is noticed about `timeout`
        // after its last heartbeat.
        expire_dead_executor_interval_seconds: (timeout / 3).max(1),
        no_executors_grace_period_seconds: timeout,
        override_logical_codec: Some(Arc::new(codec::LogicalCodec::default())),
        override_physical_codec: Some(Arc::new(codec::PhysicalCodec::default())),
        ..Default::default()
    };
    tracing::info!(
        "patchgd scheduler listening on {} (executors lost after {timeout} s without a heartbeat)",
        options.bind
    );
    let cluster = BallistaCluster::new_from_config(&config).await?;
    start_server(cluster, options.bind, Arc::new(config)).await?;
    Ok(())
}

/// What an executor's tasks can call: Ballista's defaults, every scalar function a patchgd
/// client can plan ([`codec::scalar_functions`]) and patchgd's UDFs.
fn function_registry() -> ballista_core::registry::BallistaFunctionRegistry {
    let mut registry = ballista_core::registry::BallistaFunctionRegistry::default();
    registry.scalar_functions.extend(
        codec::scalar_functions()
            .iter()
            .map(|(name, f)| (name.clone(), f.clone())),
    );
    registry
}

/// Run an executor with patchgd's codecs until the process ends (or the scheduler stops it).
pub async fn run_executor(options: &ExecutorOptions) -> Result<(), ClusterError> {
    let scheduler = socket_address(&options.scheduler)?;
    let grpc_port = match options.grpc_port {
        0 => options
            .bind
            .port()
            .checked_add(1)
            .ok_or_else(|| ClusterError::Address {
                address: options.bind.to_string(),
                reason: "no port after it for gRPC: give --grpc-port".into(),
            })?,
        p => p,
    };
    let config = ExecutorProcessConfig {
        bind_host: options.bind.ip().to_string(),
        external_host: Some(
            options
                .external_host
                .clone()
                .unwrap_or_else(|| options.bind.ip().to_string()),
        ),
        port: options.bind.port(),
        grpc_port,
        scheduler_host: scheduler.ip().to_string(),
        scheduler_port: scheduler.port(),
        scheduler_connect_timeout_seconds: 30,
        vcores: options.concurrent_tasks.max(1),
        work_dir: options.work_dir.clone(),
        executor_heartbeat_interval_seconds: options.heartbeat.as_secs().max(1),
        override_logical_codec: Some(Arc::new(codec::LogicalCodec::default())),
        override_physical_codec: Some(Arc::new(codec::PhysicalCodec::default())),
        override_function_registry: Some(Arc::new(function_registry())),
        ..Default::default()
    };
    tracing::info!(
        "patchgd executor {} on {} (gRPC {grpc_port}), scheduler {}, {} tasks at once",
        config.executor_id,
        options.bind,
        options.scheduler,
        config.vcores
    );
    start_executor_process(Arc::new(config)).await?;
    Ok(())
}

/// A session whose queries run on the cluster whose scheduler is at `url`
/// (`df://HOST:PORT`), with `partitions` partitions per scan. Register patchgd's tables in it
/// with [`crate::sql::register`], as in a local session.
pub async fn connect(url: &str, partitions: usize) -> Result<SessionContext, ClusterError> {
    let unreachable = |reason: String| ClusterError::Unreachable {
        url: url.to_string(),
        reason,
    };
    let address = url
        .strip_prefix("df://")
        .ok_or_else(|| ClusterError::NotACluster {
            url: url.to_string(),
        })?
        .trim_end_matches('/');
    let socket = socket_address(address)?;
    // Ballista connects lazily, at the first query: find out now.
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(socket),
    )
    .await
    .map_err(|_| unreachable("no answer in 10 s".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    let config = SessionConfig::new_with_ballista()
        .with_target_partitions(partitions.max(1))
        .with_information_schema(true)
        .with_ballista_logical_extension_codec(Arc::new(codec::LogicalCodec::default()))
        .with_ballista_physical_extension_codec(Arc::new(codec::PhysicalCodec::default()));
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_default_features()
        .build();
    Ok(SessionContext::remote_with_state(&format!("df://{address}"), state).await?)
}
