//! The `specter` command line: the flags of each subcommand (clap), and one
//! way to run each: check what can be checked before binding (exit code 2
//! with one line on stderr), then run it on a tokio runtime. The admin API's
//! small HTTP client is [`admin_client`].

mod admin_client;

use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::config::{LogFormat, NodeConfig, NodeSettings};
use crate::net::bind_endpoint;
use crate::net::tls::NodeTls;
use crate::pki;

/// Exit code for bad flags, config or certificates (as clap uses for usage errors).
const EXIT_USAGE: u8 = 2;

/// Longest a stopping client waits for its connections' close frames to
/// leave (each is drained within three probe timeouts, a few round trips).
const CLOSE_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Parser)]
#[command(
    name = "specter",
    version,
    about = "A leaderless, self-hosted reverse-tunnel network over QUIC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the cluster CA and node certificates.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Run a public node.
    Node {
        /// Read settings from this TOML file (flags override it).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<NodeSettings>,
    },
    /// Expose a local service through the overlay (the client daemon).
    Tunnel {
        /// Read settings, and several tunnels, from this TOML file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Local target: tcp://HOST:PORT or http://HOST:PORT.
        #[arg(long)]
        to: Option<String>,
        /// Tunnel name (default: the saved one, or three random words).
        #[arg(long)]
        name: Option<String>,
        /// Seed nodes' QUIC addresses, comma-separated.
        #[arg(long, value_delimiter = ',')]
        via: Vec<String>,
        /// Cluster CA certificate (PEM).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Where the client key and name are kept (default .specter-client).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Number of nodes to attach to (default 3).
        #[arg(long)]
        attachments: Option<usize>,
        /// File holding a client token (for nodes run with --client-auth token).
        #[arg(long)]
        token: Option<PathBuf>,
        /// Write JSON (names, public URLs, attachments) here on every change.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Seconds visitors under way may take to finish once the client is
        /// told to stop (default 30; a second signal stops it at once).
        #[arg(long, value_name = "SECS")]
        grace_period: Option<u64>,
        /// Worker threads (default 1, or TOKIO_WORKER_THREADS; see README).
        #[arg(long, value_name = "N")]
        workers: Option<usize>,
    },
    /// Reach a tunnel's TCP service through a node's ingress.
    Connect {
        /// NAME.DOMAIN of the tunnel.
        host: String,
        /// A node's ingress address (HOST:PORT).
        #[arg(long)]
        via: String,
        /// CA that signed the ingress certificate (PEM).
        #[arg(long)]
        ca: PathBuf,
        /// Accept local connections here and carry each through the tunnel.
        #[arg(long, conflicts_with = "stdio")]
        listen: Option<std::net::SocketAddr>,
        /// Carry standard input and output (for ssh ProxyCommand).
        #[arg(long)]
        stdio: bool,
    },
    /// Make a running node read its config file and certificate and key
    /// files again (as SIGHUP does); prints what changed.
    Reload {
        /// The node's admin address.
        #[arg(long)]
        admin: std::net::SocketAddr,
    },
    /// Show the cluster as one node sees it (members, ring, tunnels, counters).
    Status {
        /// The node's admin address.
        #[arg(long)]
        admin: std::net::SocketAddr,
        /// Print the node's /status JSON as it is.
        #[arg(long)]
        json: bool,
    },
    /// Query the DHT through a node's admin API.
    #[command(subcommand)]
    Dht(DhtCommand),
    /// Run a local overlay on loopback with a throwaway CA.
    Demo {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Show the nodes' and the client's log (RUST_LOG also works).
        #[arg(short, long)]
        verbose: bool,
    },
}

#[derive(Subcommand)]
enum DhtCommand {
    /// Show the record for NAME as seen from the node, with the lookup's hop count.
    Get {
        /// Tunnel name.
        name: String,
        /// The node's admin address.
        #[arg(long)]
        admin: std::net::SocketAddr,
    },
    /// Register NAME at the node as an operator test (10-minute lease).
    Put {
        /// Tunnel name.
        name: String,
        /// The node's admin address.
        #[arg(long)]
        admin: std::net::SocketAddr,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a cluster CA (ca.crt, ca.key) in DIR.
    Init {
        /// Directory to write into.
        #[arg(long)]
        dir: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a client token signed by the CA key (for --client-auth token).
    IssueClientToken {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Names the holder may register must start with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Days until the token expires.
        #[arg(long, default_value_t = 30)]
        days: u64,
        /// File to write the token to (mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Overwrite an existing token file.
        #[arg(long)]
        force: bool,
    },
    /// Issue a wildcard ingress certificate for *.DOMAIN (edge.crt, edge.key)
    /// signed by the cluster CA, for tests and demos.
    IssueEdge {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// The public domain.
        #[arg(long)]
        domain: String,
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a node certificate (node.crt, node.key) signed by the CA.
    IssueNode {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// The node's DNS name (a SAN).
        #[arg(long)]
        name: String,
        /// IP addresses the node is reached at (SANs), repeatable.
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Ca(cmd) => match run_ca(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => usage_error(&err),
        },
        Command::Node { config, settings } => {
            // Everything that can be checked is checked before binding.
            let flags = (config.clone(), settings.clone());
            let (config, tls) = match load_node(config, *settings) {
                Ok(c) => c,
                Err(err) => return usage_error(&err),
            };
            init_tracing(config.log_format);
            let reload = Box::new(move || load_node(flags.0.clone(), (*flags.1).clone()));
            block_on(crate::node::run(config, tls, reload, shutdown_signal()))
        }
        Command::Tunnel {
            config,
            to,
            name,
            via,
            ca,
            state_dir,
            attachments,
            token,
            ready_file,
            grace_period,
            workers,
        } => {
            let flags = crate::config::TunnelSettings {
                via,
                ca,
                state_dir,
                attachments,
                token,
                ready_file,
                grace_period,
                workers,
                tunnels: to
                    .map(|to| vec![crate::config::TunnelEntry { name, to }])
                    .unwrap_or_default(),
            };
            let settings = match crate::config::TunnelSettings::load(config.as_deref()) {
                Ok(file) => flags.over(file),
                Err(err) => return usage_error(&err),
            };
            let workers = settings.workers(std::env::var_os("TOKIO_WORKER_THREADS").is_some());
            let options = match settings.resolve() {
                Ok(o) => o,
                Err(err) => return usage_error(&err),
            };
            init_tracing(LogFormat::Human);
            // One descriptor per visitor, for the connection to the target.
            crate::files::raise_descriptor_limit();
            block_on_with(workers, async move {
                let endpoint = bind_endpoint("0.0.0.0:0".parse()?)?;
                // The first signal stops it once visitors under way are
                // done; a second, at once.
                let stop = tokio_util::sync::CancellationToken::new();
                let now = tokio_util::sync::CancellationToken::new();
                let (stopper, hurry) = (stop.clone(), now.clone());
                tokio::spawn(async move {
                    shutdown_signal().await;
                    stopper.cancel();
                    shutdown_signal().await;
                    hurry.cancel();
                });
                let ran = crate::client::run_until(options, endpoint.clone(), stop, now).await;
                // The attachments are closed: let their close frames leave
                // before the process does, so no node waits for an idle
                // timeout to notice.
                let _ = tokio::time::timeout(CLOSE_FLUSH, endpoint.wait_idle()).await;
                ran
            })
        }
        Command::Connect {
            host,
            via,
            ca,
            listen,
            stdio,
        } => {
            let ca_pem = match std::fs::read(&ca) {
                Ok(p) => p,
                Err(e) => return usage_error(&anyhow::anyhow!("{}: {e}", ca.display())),
            };
            if listen.is_none() && !stdio {
                return usage_error(&anyhow::anyhow!("pass --listen ADDR or --stdio"));
            }
            init_tracing(LogFormat::Human);
            crate::files::raise_descriptor_limit();
            block_on(run_connect(host, via, ca_pem, listen))
        }
        Command::Status { admin, json } => match admin_client::status(admin, json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        },
        Command::Reload { admin } => match admin_client::reload(admin) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(err) => usage_error(&err),
        },
        Command::Dht(cmd) => {
            let (write, name, admin) = match cmd {
                DhtCommand::Get { name, admin } => (false, name, admin),
                DhtCommand::Put { name, admin } => (true, name, admin),
            };
            match admin_client::dht(admin, write, &name) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(err) => usage_error(&err),
            }
        }
        Command::Demo { nodes, verbose } => {
            // Quiet by default: the demo prints what to do next.
            init_tracing_with(LogFormat::Human, if verbose { "info" } else { "warn" });
            block_on(crate::demo::run(nodes))
        }
    }
}

fn usage_error(err: &anyhow::Error) -> ExitCode {
    eprintln!("error: {err:#}");
    ExitCode::from(EXIT_USAGE)
}

/// Runs `job` on a new runtime; an error is one line on stderr and exit
/// code 1.
fn block_on(job: impl Future<Output = Result<()>>) -> ExitCode {
    block_on_with(None, job)
}

/// [`block_on`] with `workers` worker threads (`None`: one per core, or
/// `TOKIO_WORKER_THREADS`).
fn block_on_with(workers: Option<usize>, job: impl Future<Output = Result<()>>) -> ExitCode {
    match runtime(workers).and_then(|rt| rt.block_on(job)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime(workers: Option<usize>) -> Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn init_tracing(format: LogFormat) {
    init_tracing_with(format, "info");
}

/// Logs to stderr, filtered by `RUST_LOG` (`LEVEL`, `TARGET=LEVEL`, comma
/// separated), else at `default` and above. A `Targets` filter rather than
/// tracing-subscriber's `EnvFilter`: the latter compiles its directives
/// with a regex engine, whose code and tables every process would map for
/// filters of span names and field values that nobody here uses.
fn init_tracing_with(format: LogFormat, default: &str) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let fallback = || default.parse::<Targets>().unwrap_or_default();
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => spec.parse::<Targets>().unwrap_or_else(|err| {
            eprintln!("RUST_LOG={spec:?}: {err}; logging at {default}");
            fallback()
        }),
        _ => fallback(),
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry();
    match format {
        LogFormat::Human => registry.with(layer.with_filter(filter)).init(),
        LogFormat::Json => registry.with(layer.json().with_filter(filter)).init(),
    }
}

fn run_ca(cmd: CaCommand) -> Result<()> {
    match cmd {
        CaCommand::Init { dir, force } => {
            pki::init_ca(&dir, force)?;
            println!(
                "wrote {} and {}",
                dir.join(pki::CA_CERT_FILE).display(),
                dir.join(pki::CA_KEY_FILE).display()
            );
        }
        CaCommand::IssueClientToken {
            ca_dir,
            prefix,
            days,
            out,
            force,
        } => {
            let read = |f: &str| {
                std::fs::read_to_string(ca_dir.join(f))
                    .with_context(|| format!("reading {}", ca_dir.join(f).display()))
            };
            let ca = pki::CaPem {
                cert: read(pki::CA_CERT_FILE)?,
                key: read(pki::CA_KEY_FILE)?,
            };
            let expires_at = crate::clock::now_ms() / 1_000 + days * 86_400;
            let claims = crate::token::TokenClaims {
                expires_at,
                prefix,
                nonce: rand::random(),
            };
            let token = crate::token::issue(&ca, &claims)?;
            pki::write_file(&out, &token, true, force)?;
            println!("wrote {} (expires in {days} days)", out.display());
        }
        CaCommand::IssueEdge {
            ca_dir,
            domain,
            out,
            force,
        } => {
            pki::issue_edge(&ca_dir, &domain, &out, force)?;
            println!(
                "wrote {} and {} for *.{domain}",
                out.join(pki::EDGE_CERT_FILE).display(),
                out.join(pki::EDGE_KEY_FILE).display()
            );
        }
        CaCommand::IssueNode {
            ca_dir,
            name,
            ip,
            out,
            force,
        } => {
            let id = pki::issue_node(&ca_dir, &name, &ip, &out, force)?;
            println!(
                "wrote {} and {} (node id {id})",
                out.join(pki::NODE_CERT_FILE).display(),
                out.join(pki::NODE_KEY_FILE).display()
            );
        }
    }
    Ok(())
}

/// `specter connect`: one TLS connection per local connection (or stdio).
async fn run_connect(
    host: String,
    via: String,
    ca_pem: Vec<u8>,
    listen: Option<std::net::SocketAddr>,
) -> Result<()> {
    let visitor = crate::ingress::tcp::Visitor::new(&via, &host, &ca_pem)?;
    let Some(addr) = listen else {
        let mut tls = visitor.connect().await?;
        let mut stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
        specter_tunnel::splice::splice(&mut stdio, &mut tls).await?;
        return Ok(());
    };
    // Check the name once, so a typo is an error now rather than a reset
    // on every connection later; the check reaches no target.
    match visitor.check().await {
        Ok(_) => {}
        Err(err)
            if err
                .downcast_ref::<crate::ingress::tcp::UnknownTunnel>()
                .is_some() =>
        {
            return Err(err);
        }
        Err(err) => tracing::warn!("{err:#}; listening anyway"),
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    println!(
        "listening on {} for {host} via {via}",
        listener.local_addr()?
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(crate::ingress::tcp::connect_listener(
        listener,
        std::sync::Arc::new(visitor),
        stop.clone(),
    ));
    shutdown_signal().await;
    stop.cancel();
    let _ = serving.await;
    Ok(())
}

fn load_node(config: Option<PathBuf>, flags: NodeSettings) -> Result<(NodeConfig, NodeTls)> {
    let file = match config {
        Some(path) => NodeSettings::from_file(&path)?,
        None => NodeSettings::default(),
    };
    let config = flags.over(file).resolve()?;
    let tls = NodeTls::load(&config.ca, &config.cert, &config.key)?;
    Ok((config, tls))
}

/// Completes on SIGTERM or SIGINT. If a handler cannot be installed (which
/// does not happen on Unix), it says so and waits for the other.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(err) => {
                tracing::warn!(%err, "cannot watch SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        r = tokio::signal::ctrl_c() => if let Err(err) = r {
            tracing::warn!(%err, "cannot watch SIGINT");
            std::future::pending::<()>().await;
        },
        () = term => {}
    }
}
