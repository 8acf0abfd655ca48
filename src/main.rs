//! The `specter` command.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use specter::config::{LogFormat, NodeConfig, NodeSettings};
use specter::node::{Node, NodeOptions};
use specter::tls::NodeTls;
use specter::{admin, bind_endpoint, generation_now, pki};
use specter_gossip::GossipConfig;
use tokio_util::sync::CancellationToken;

/// Exit code for bad flags, config or certificates (as clap uses for usage errors).
const EXIT_USAGE: u8 = 2;

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
    /// Query the DHT through a node's admin API.
    #[command(subcommand)]
    Dht(DhtCommand),
    /// Run a local overlay on loopback with a throwaway CA.
    Demo {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Ca(cmd) => match run_ca(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => usage_error(&err),
        },
        Command::Node { config, settings } => {
            // Everything that can be checked is checked before binding.
            let checked = load_node(config, *settings);
            let (config, tls) = match checked {
                Ok(c) => c,
                Err(err) => return usage_error(&err),
            };
            init_tracing(config.log_format);
            match runtime().and_then(|rt| rt.block_on(run_node(config, tls))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: {err:#}");
                    ExitCode::FAILURE
                }
            }
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
        } => {
            let flags = specter::config::TunnelSettings {
                via,
                ca,
                state_dir,
                attachments,
                token,
                tunnels: to
                    .map(|to| vec![specter::config::TunnelEntry { name, to }])
                    .unwrap_or_default(),
            };
            let options = match specter::config::TunnelSettings::load(config.as_deref())
                .and_then(|file| flags.over(file).resolve())
            {
                Ok(o) => o,
                Err(err) => return usage_error(&err),
            };
            init_tracing(LogFormat::Human);
            let run = async move {
                let endpoint = bind_endpoint("0.0.0.0:0".parse()?)?;
                let stop = tokio_util::sync::CancellationToken::new();
                let stopper = stop.clone();
                tokio::spawn(async move {
                    let _ = wait_for_signal().await;
                    stopper.cancel();
                });
                specter::client::run(options, endpoint, stop).await
            };
            match runtime().and_then(|rt| rt.block_on(run)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: {err:#}");
                    ExitCode::FAILURE
                }
            }
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
            match runtime().and_then(|rt| rt.block_on(run_connect(host, via, ca_pem, listen))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Dht(cmd) => match run_dht(cmd) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(err) => usage_error(&err),
        },
        Command::Demo { nodes } => {
            init_tracing(LogFormat::Human);
            match runtime().and_then(|rt| rt.block_on(specter::demo::run(nodes))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn usage_error(err: &anyhow::Error) -> ExitCode {
    eprintln!("error: {err:#}");
    ExitCode::from(EXIT_USAGE)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
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
            let expires_at = specter::dht::now_ms() / 1_000 + days * 86_400;
            let claims = specter::token::TokenClaims {
                expires_at,
                prefix,
                nonce: rand::random(),
            };
            let token = specter::token::issue(&ca, &claims)?;
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
    let visitor = specter::ingress::Visitor::new(&via, &host, &ca_pem)?;
    let Some(addr) = listen else {
        let mut tls = visitor.connect().await?;
        let mut stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
        specter_tunnel::splice::splice(&mut stdio, &mut tls).await?;
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    println!(
        "listening on {} for {host} via {via}",
        listener.local_addr()?
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(specter::ingress::connect_listener(
        listener,
        std::sync::Arc::new(visitor),
        stop.clone(),
    ));
    wait_for_signal().await?;
    stop.cancel();
    let _ = serving.await;
    Ok(())
}

/// Prints the admin API's answer; returns whether it was a success.
fn run_dht(cmd: DhtCommand) -> Result<bool> {
    use std::io::{Read, Write};
    let (method, path, name, admin) = match cmd {
        DhtCommand::Get { name, admin } => ("GET", "/dht/get", name, admin),
        DhtCommand::Put { name, admin } => ("POST", "/dht/put", name, admin),
    };
    let mut stream =
        std::net::TcpStream::connect_timeout(&admin, std::time::Duration::from_secs(5))
            .with_context(|| format!("connecting to the admin API at {admin}"))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path}?name={name} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed answer")?;
    print!("{body}");
    Ok(head.starts_with("HTTP/1.1 200"))
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

async fn run_node(config: NodeConfig, tls: NodeTls) -> Result<()> {
    let endpoint =
        bind_endpoint(config.listen).with_context(|| format!("binding UDP {}", config.listen))?;
    let quic = endpoint.local_addr()?;
    // `--listen IP:0` lets the OS pick the port; advertise the one it picked.
    let mut config = config;
    if config.advertise.port() == 0 {
        config.advertise.set_port(quic.port());
    }
    let admin_listener = match config.admin {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the admin API on {addr}"))?,
        ),
        None => None,
    };
    let node = Node::start(
        endpoint,
        &tls,
        NodeOptions {
            advertise: config.advertise,
            seeds: config.join.clone(),
            gossip: GossipConfig::default(),
            generation: generation_now(),
            rng_seed: rand::random(),
            client_auth: config.client_auth,
        },
    )?;
    let cancel = CancellationToken::new();
    let mut admin_addr = None;
    if let Some(listener) = admin_listener {
        admin_addr = Some(listener.local_addr()?);
        tokio::spawn(admin::serve(listener, node.shared(), cancel.clone()));
    }
    let mut https_addr = None;
    if let Some(ingress) = &config.ingress {
        let edge =
            specter::ingress::Edge::load(&ingress.domain, &ingress.edge_cert, &ingress.edge_key)?;
        let listener = tokio::net::TcpListener::bind(ingress.https)
            .await
            .with_context(|| format!("binding the ingress on {}", ingress.https))?;
        https_addr = Some(listener.local_addr()?);
        node.tunnels()
            .set_public(&ingress.domain, listener.local_addr()?.port());
        tokio::spawn(specter::ingress::serve(
            listener,
            std::sync::Arc::new(edge),
            node.tunnels(),
            cancel.clone(),
        ));
    }
    let mut http_addr = None;
    if let Some((addr, mode, domain)) = &config.http {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the plain-HTTP ingress on {addr}"))?;
        http_addr = Some(listener.local_addr()?);
        tokio::spawn(specter::ingress::serve_plain(
            listener,
            domain.clone(),
            *mode,
            https_addr.map(|a| a.port()),
            node.tunnels(),
            cancel.clone(),
        ));
    }
    if let Some(path) = &config.ready_file {
        let ready = serde_json::json!({
            "id": node.id().to_string(),
            "quic": quic,
            "advertise": config.advertise,
            "admin": admin_addr,
            "https": https_addr,
            "http": http_addr,
            "pid": std::process::id(),
        });
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, ready.to_string())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    }
    wait_for_signal().await?;
    tracing::info!("shutting down");
    cancel.cancel();
    node.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}
