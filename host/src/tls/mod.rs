//! TLS for producers and readers (`--tls-listen`): the certificate and key
//! (read again on SIGHUP), optional client certificates (`--tls-client-ca`),
//! the handshake counters, and each connection's state ([`TlsConn`]).
//!
//! rustls (ring, TLS 1.3 only) makes the handshake on the thread that owns
//! the socket; once it is done, the connection's records are opened in
//! place in its input buffer and sealed into its output buffer with the
//! keys rustls hands over (`eventstream_client::tls::Keys`), the way kernel
//! TLS takes a connection over. docs/decisions.md ("TLS") says why.

mod conn;

pub use conn::{Failure, TlsConn};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use clap::Args;
use eventstream_client::tls::{provider, read_certs, read_key};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::ServerConfig;

/// `serve`'s TLS flags.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Address to accept producers and readers on with TLS (beside
    /// `--listen`, which `--listen none` turns off).
    #[arg(long, value_name = "ADDR")]
    pub tls_listen: Option<SocketAddr>,
    /// The server's certificate chain (PEM), read again on SIGHUP.
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM), read again on SIGHUP.
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by these CAs (mutual TLS).
    #[arg(long, value_name = "PEM")]
    pub tls_client_ca: Option<PathBuf>,
}

/// The TLS flags of `produce`, `consume` and `load`.
#[derive(Args, Debug, Clone, Default)]
pub struct ClientTlsArgs {
    /// Connect with TLS (to a `--tls-listen` port), trusting the CA
    /// certificates in this PEM file.
    #[arg(long, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// With --tls-ca: present this client certificate chain (PEM), for a
    /// server with --tls-client-ca.
    #[arg(long, value_name = "PEM", requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Check the server's certificate for this name instead of the IP
    /// address connected to.
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    pub tls_server_name: Option<String>,
}

impl ClientTlsArgs {
    /// The client set-up, None without `--tls-ca`.
    pub fn client(&self) -> Result<Option<eventstream_client::TlsClient>, String> {
        let Some(ca) = &self.tls_ca else {
            return Ok(None);
        };
        let cert = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
        let mut c = eventstream_client::TlsClient::new(ca, cert)?;
        if let Some(n) = &self.tls_server_name {
            c = c.with_server_name(n)?;
        }
        Ok(Some(c))
    }
}

/// Why a TLS handshake failed (the `cause` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// Not finished within `--frame-timeout`.
    Timeout,
    /// The peer closed the connection during it.
    Closed,
    /// Bytes that are not TLS (a plaintext client on the TLS port,
    /// garbage).
    Malformed,
    /// The peer refused our certificate (it sent an alert: unknown CA,
    /// expired, wrong name).
    PeerAlert,
    /// `--tls-client-ca` is set and the client sent no certificate.
    NoClientCert,
    /// The client's certificate does not verify (another CA, expired).
    ClientCert,
    /// No protocol version or cipher suite in common.
    Incompatible,
    /// Any other protocol error.
    Protocol,
}

impl Cause {
    /// Every cause, in the order of [`TlsStats`]' counters.
    pub const ALL: [Cause; 8] = [
        Cause::Timeout,
        Cause::Closed,
        Cause::Malformed,
        Cause::PeerAlert,
        Cause::NoClientCert,
        Cause::ClientCert,
        Cause::Incompatible,
        Cause::Protocol,
    ];

    /// Its label value.
    pub fn name(self) -> &'static str {
        match self {
            Cause::Timeout => "timeout",
            Cause::Closed => "closed",
            Cause::Malformed => "malformed",
            Cause::PeerAlert => "peer_alert",
            Cause::NoClientCert => "no_client_cert",
            Cause::ClientCert => "client_cert",
            Cause::Incompatible => "incompatible",
            Cause::Protocol => "protocol",
        }
    }

    /// The cause of a rustls error during a handshake.
    pub fn of(e: &rustls::Error) -> Cause {
        use rustls::Error as E;
        match e {
            E::InvalidMessage(_) | E::InappropriateMessage { .. } => Cause::Malformed,
            E::NoCertificatesPresented => Cause::NoClientCert,
            E::InvalidCertificate(_) => Cause::ClientCert,
            E::AlertReceived(_) => Cause::PeerAlert,
            E::PeerIncompatible(_) => Cause::Incompatible,
            _ => Cause::Protocol,
        }
    }
}

/// TLS counters for `/metrics`.
#[derive(Default)]
pub struct TlsStats {
    /// Connections with TLS open now (producers and readers).
    pub open: AtomicU64,
    /// Handshakes completed.
    pub handshakes: AtomicU64,
    /// Handshakes failed, by [`Cause::ALL`]'s order.
    pub failures: [AtomicU64; 8],
    /// Certificate reloads (SIGHUP) that failed (the old one stays).
    pub reload_failures: AtomicU64,
}

impl TlsStats {
    /// Counts one failed handshake.
    pub fn failed(&self, cause: Cause) {
        if let Some(i) = Cause::ALL.iter().position(|&c| c == cause) {
            self.failures[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The files a server's TLS set-up is read from.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The certificate chain (PEM).
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    /// The CAs of client certificates (PEM), for mutual TLS.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// From the flags: None without `--tls-listen`; an error for a flag
    /// given without the others it needs.
    pub fn from_args(a: &TlsArgs) -> Result<Option<TlsFiles>, String> {
        match (&a.tls_listen, &a.tls_cert, &a.tls_key) {
            (Some(_), Some(cert), Some(key)) => Ok(Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: a.tls_client_ca.clone(),
            })),
            (Some(_), _, _) => Err("--tls-listen needs --tls-cert and --tls-key".into()),
            (None, None, None) if a.tls_client_ca.is_none() => Ok(None),
            (None, _, _) => {
                Err("--tls-cert, --tls-key and --tls-client-ca need --tls-listen".into())
            }
        }
    }

    /// Reads the files into a server configuration.
    pub fn load(&self) -> Result<ServerConfig, String> {
        let provider = Arc::new(provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_certs(ca)? {
                    roots
                        .add(c)
                        .map_err(|e| format!("a bad CA certificate in {}: {e}", ca.display()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(read_certs(&self.cert)?, read_key(&self.key)?)
            .map_err(|e| {
                format!(
                    "{} and {} do not make a certificate and its key: {e}",
                    self.cert.display(),
                    self.key.display()
                )
            })?;
        // The records after the handshake are ours (see the module docs):
        // rustls hands its keys over, and sends no session tickets after
        // the handshake (nothing of its own may follow it).
        config.enable_secret_extraction = true;
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(NoServerSessionStorage {});
        Ok(config)
    }
}

/// The server's TLS: its current configuration and counters.
pub struct ServerTls {
    files: TlsFiles,
    config: RwLock<Arc<ServerConfig>>,
    /// Counters for `/metrics`.
    pub stats: TlsStats,
}

impl ServerTls {
    /// Reads the files; an error is one line for the operator.
    pub fn new(files: TlsFiles) -> Result<ServerTls, String> {
        let config = files.load()?;
        Ok(ServerTls {
            files,
            config: RwLock::new(Arc::new(config)),
            stats: TlsStats::default(),
        })
    }

    /// The configuration new connections use (read once per accept).
    pub fn config(&self) -> Arc<ServerConfig> {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Reads the certificate, key and client CAs again (SIGHUP): new
    /// connections use them, open ones keep theirs. On an error the old
    /// ones stay, and the error is logged and counted.
    pub fn reload(&self) {
        match self.files.load() {
            Ok(c) => {
                match self.config.write() {
                    Ok(mut g) => *g = Arc::new(c),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(c),
                }
                eprintln!(
                    "eventstream: TLS certificate reloaded from {}",
                    self.files.cert.display()
                );
            }
            Err(e) => {
                self.stats.reload_failures.fetch_add(1, Ordering::Relaxed);
                eprintln!("eventstream: TLS certificate not reloaded (the old one stays): {e}");
            }
        }
    }
}
