//! Connecting to etcd: endpoints, TLS, user and password, timeouts, and
//! turning the client's errors into the few cases callers act on
//! (unreachable, refused, anything else).

use std::{fmt, future::Future, path::PathBuf, time::Duration};

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};

use super::location::RegistryUrl;

/// How long to wait for a TCP (and TLS) connection to a member.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one request may take before the member counts as unreachable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings: a member that vanished without a word (power loss, a
/// partition) is noticed within interval + timeout.
const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(2), Duration::from_secs(2));

/// Everything needed to reach the registry.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub url: RegistryUrl,
    pub tls: Option<TlsFiles>,
    pub credentials: Option<Credentials>,
}

/// TLS to etcd: the CA that signed the members' certificates, and this
/// client's certificate and key when etcd asks for one
/// (`--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// etcd user and password (etcd's own authentication).
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, password hidden)", self.user)
    }
}

/// What went wrong talking to etcd.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// The configuration cannot work (a file missing, a bad option).
    #[error("{0}")]
    Config(String),
    /// No member answered in time.
    #[error("etcd at {endpoints} is unreachable: {detail}")]
    Unreachable { endpoints: String, detail: String },
    /// etcd refused the credentials or the operation.
    #[error("etcd at {endpoints} refused: {detail}")]
    Refused { endpoints: String, detail: String },
    /// Any other error etcd reported.
    #[error("etcd at {endpoints}: {detail}")]
    Etcd { endpoints: String, detail: String },
}

impl EtcdConfig {
    fn endpoints_text(&self) -> String {
        self.url.endpoints.join(",")
    }

    /// Classifies an etcd client error.
    pub fn error(&self, e: etcd_client::Error) -> RegistryError {
        use etcd_client::Error as E;
        let endpoints = self.endpoints_text();
        match e {
            E::GRpcStatus(s) => {
                let mut detail = if s.message().is_empty() {
                    format!("{:?}", s.code())
                } else {
                    s.message().to_owned()
                };
                // The causes say what happened below gRPC (connection
                // refused, a TLS alert such as "certificate required").
                let mut cause = std::error::Error::source(&s);
                while let Some(c) = cause {
                    let t = c.to_string();
                    if !detail.contains(&t) {
                        detail.push_str(": ");
                        detail.push_str(&t);
                    }
                    cause = c.source();
                }
                // etcd reports a wrong password as InvalidArgument.
                let auth = s.message().contains("authentication failed")
                    || s.message().contains("user name is empty");
                match s.code() {
                    _ if auth => RegistryError::Refused { endpoints, detail },
                    tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled => RegistryError::Unreachable { endpoints, detail },
                    tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
                        RegistryError::Refused { endpoints, detail }
                    }
                    _ => RegistryError::Etcd { endpoints, detail },
                }
            }
            E::TransportError(t) => RegistryError::Unreachable {
                endpoints,
                detail: crate::error_text(&anyhow::Error::new(t)),
            },
            E::IoError(io) => RegistryError::Unreachable {
                endpoints,
                detail: io.to_string(),
            },
            E::InvalidArgs(m) | E::EndpointError(m) => RegistryError::Config(m),
            E::InvalidUri(u) => RegistryError::Config(u.to_string()),
            other => RegistryError::Etcd {
                endpoints,
                detail: other.to_string(),
            },
        }
    }

    fn timeout(&self, what: &str) -> RegistryError {
        RegistryError::Unreachable {
            endpoints: self.endpoints_text(),
            detail: format!("no answer to {what} within {REQUEST_TIMEOUT:?}"),
        }
    }

    /// Runs one request with the request deadline and classified errors.
    pub async fn call<T>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, RegistryError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
            Ok(r) => r.map_err(|e| self.error(e)),
            Err(_) => Err(self.timeout(what)),
        }
    }

    /// A client connected to one member that answers a linearizable read
    /// (so it is part of a quorum), trying the members in turn from a
    /// random one. One member per client, and the next one on the next
    /// connection, rather than etcd-client's balancing over all members:
    /// that sends some requests to a dead member and fails them ("tcp
    /// connect error") instead of trying another.
    pub async fn connect(&self) -> Result<Client, RegistryError> {
        let n = self.url.endpoints.len();
        let mut b = [0u8; 1];
        let _ = rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut b);
        let start = usize::from(b[0]) % n.max(1);
        let mut failures = Vec::new();
        let mut refused = None;
        let mut refusals = 0;
        for i in 0..n {
            let member = &self.url.endpoints[(start + i) % n];
            match self.connect_one(member).await {
                Ok(c) => return Ok(c),
                Err(RegistryError::Config(m)) => return Err(RegistryError::Config(m)),
                Err(e @ RegistryError::Refused { .. }) => {
                    failures.push(format!("{member}: {}", detail(&e)));
                    refused = Some(e);
                    refusals += 1;
                }
                Err(e) => failures.push(format!("{member}: {}", detail(&e))),
            }
        }
        // Every member refused: the credentials are wrong, say so.
        if let Some(RegistryError::Refused { .. }) = refused
            && refusals == n
        {
            return Err(RegistryError::Refused {
                endpoints: self.endpoints_text(),
                detail: failures.join("; "),
            });
        }
        Err(RegistryError::Unreachable {
            endpoints: self.endpoints_text(),
            detail: failures.join("; "),
        })
    }

    async fn connect_one(&self, member: &str) -> Result<Client, RegistryError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEPALIVE.0, KEEPALIVE.1)
            .with_keep_alive_while_idle(true)
            // A member cut off from the others must not serve a watch that
            // will never see another change.
            .with_require_leader(true);
        let scheme = if let Some(tls) = &self.tls {
            opts = opts.with_tls(self.tls_options(tls)?);
            "https"
        } else {
            "http"
        };
        if let Some(c) = &self.credentials {
            opts = opts.with_user(c.user.clone(), c.password.clone());
        }
        // With a user, connecting authenticates (a request); without, it
        // only sets up the channel: the read below is the real test.
        let client = self
            .call(
                "authentication",
                Client::connect([format!("{scheme}://{member}")], Some(opts)),
            )
            .await?;
        let mut kv = client.kv_client();
        self.call(
            "a first read",
            kv.get(
                self.url.prefix.clone(),
                Some(GetOptions::new().with_keys_only().with_limit(1)),
            ),
        )
        .await?;
        Ok(client)
    }

    /// Checks what can be checked without etcd (TLS files readable).
    pub fn validate(&self) -> Result<(), RegistryError> {
        match &self.tls {
            Some(t) => self.tls_options(t).map(|_| ()),
            None => Ok(()),
        }
    }

    fn tls_options(&self, tls: &TlsFiles) -> Result<TlsOptions, RegistryError> {
        let read = |what: &str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| {
                RegistryError::Config(format!("cannot read the etcd {what} {}: {e}", p.display()))
            })
        };
        let mut o = TlsOptions::new().ca_certificate(Certificate::from_pem(read(
            "CA certificate (--registry-ca)",
            &tls.ca,
        )?));
        match (&tls.cert, &tls.key) {
            (Some(c), Some(k)) => {
                o = o.identity(Identity::from_pem(
                    read("client certificate (--registry-cert)", c)?,
                    read("client key (--registry-key)", k)?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(RegistryError::Config(
                    "--registry-cert and --registry-key go together".into(),
                ));
            }
        }
        Ok(o)
    }
}

/// The part of an error after "etcd at ...:".
fn detail(e: &RegistryError) -> String {
    match e {
        RegistryError::Config(d) => d.clone(),
        RegistryError::Unreachable { detail, .. }
        | RegistryError::Refused { detail, .. }
        | RegistryError::Etcd { detail, .. } => detail.clone(),
    }
}
