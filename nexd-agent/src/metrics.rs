//! The optional Prometheus endpoint (`--metrics-listen ADDR`): `GET
//! /metrics` over plain HTTP. The text is built by the daemon loop (the one
//! owner of the state, asked over the same channel as nexctl's requests),
//! so a scrape never races a reconcile.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use crate::control::{
    protocol::{Method, Outcome, Reply},
    server::ControlCall,
};

/// The labels of a series: (name, value) pairs.
pub type Labels = Vec<(String, String)>;

/// One label.
pub fn label(k: &str, v: impl Into<String>) -> Labels {
    vec![(k.to_owned(), v.into())]
}

/// One series per field of a counters struct (named u64 fields), labelled
/// `outcome`: the struct is the single list of outcomes, so a new one
/// shows up in the metrics without a second list to keep in step.
pub fn outcomes(
    family: &prometheus_client::metrics::family::Family<
        Labels,
        prometheus_client::metrics::counter::Counter,
    >,
    counters: &impl serde::Serialize,
) {
    if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(counters) {
        for (name, v) in fields {
            if let Some(n) = v.as_u64() {
                family.get_or_create(&label("outcome", name)).inc_by(n);
            }
        }
    }
}

/// Largest request head read from a scraper.
const MAX_HEAD: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The listening endpoint.
pub struct MetricsServer {
    task: JoinHandle<()>,
    pub addr: SocketAddr,
}

impl MetricsServer {
    /// Listens on `addr` and answers scrapes with what the daemon loop
    /// renders.
    pub async fn start(
        addr: SocketAddr,
        calls: mpsc::Sender<ControlCall>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        info!(%addr, "Prometheus metrics at http://{addr}/metrics");
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((conn, _)) => {
                        tokio::spawn(serve(conn, calls.clone()));
                    }
                    Err(e) => {
                        warn!(error = %e, "metrics accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(MetricsServer { task, addr })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_head(conn: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_HEAD {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

async fn serve(mut conn: TcpStream, calls: mpsc::Sender<ControlCall>) {
    let head = match tokio::time::timeout(IO_TIMEOUT, read_head(&mut conn)).await {
        Ok(Ok(h)) => h,
        _ => return,
    };
    let mut first = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (
        first.next().unwrap_or_default(),
        first.next().unwrap_or_default(),
    );
    let (status, ctype, body) = if method != "GET" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        )
    } else if path != "/metrics" {
        ("404 Not Found", "text/plain", "try /metrics\n".to_owned())
    } else {
        let (reply, rx) = oneshot::channel();
        let text = if calls
            .send(ControlCall {
                method: Method::Metrics,
                reply,
            })
            .await
            .is_ok()
        {
            match tokio::time::timeout(IO_TIMEOUT, rx).await {
                Ok(Ok(resp)) => match resp.outcome {
                    Outcome::Ok(Reply::Metrics { text }) => Some(text),
                    _ => None,
                },
                _ => None,
            }
        } else {
            None
        };
        match text {
            Some(t) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", t),
            None => (
                "503 Service Unavailable",
                "text/plain",
                "nexd is busy or stopping\n".to_owned(),
            ),
        }
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = tokio::time::timeout(IO_TIMEOUT, conn.write_all(resp.as_bytes())).await {
        debug!(error = %e, "metrics client too slow");
    }
    let _ = conn.shutdown().await;
}
