//! The serving loops, UDP and TCP, with the checks and bounds that come
//! before any query reaches hickory: the size, the source (a set lookup;
//! over TCP before anything is read), the client's rate, then a slot among
//! its own queries in flight and among everyone's.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use hickory_server::{
    net::{NetError, runtime::TokioTime, xfer::Protocol},
    proto::{
        op::{MessageType, ResponseCode},
        rr::Record,
        serialize::binary::BinEncoder,
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::{MessageResponse, MessageResponseBuilder},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::watch,
    task::JoinSet,
    time::timeout,
};
use tracing::debug;

use super::{Counters, Shared};

/// After an accept or receive error (e.g. EMFILE), wait this long before
/// the next one instead of spinning.
const ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Where hickory puts the encoded response: the loops send it.
#[derive(Clone)]
struct Reply {
    protocol: Protocol,
    bytes: Arc<Mutex<Option<Vec<u8>>>>,
}

impl Reply {
    fn new(protocol: Protocol) -> Self {
        Reply {
            protocol,
            bytes: Arc::default(),
        }
    }

    fn take(&self) -> Option<Vec<u8>> {
        self.bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

#[async_trait::async_trait]
impl ResponseHandler for Reply {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let (info, bytes) = encode(response, self.protocol)?;
        *self.bytes.lock().unwrap_or_else(PoisonError::into_inner) = Some(bytes);
        Ok(info)
    }
}

/// Encodes `response` for `protocol`. Over UDP it fits the client's EDNS
/// buffer (512 bytes without EDNS): hickory truncates and sets TC beyond
/// it, and the client retries over TCP.
fn encode<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    protocol: Protocol,
) -> Result<(ResponseInfo, Vec<u8>), NetError> {
    let max = match protocol {
        Protocol::Udp => response.edns().map_or(512, |e| e.max_payload().max(512)),
        _ => u16::MAX,
    };
    let mut bytes = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(max);
    let info = response.destructive_emit(&mut encoder)?;
    Ok((info, bytes))
}

/// How a query ended, when it did not end with an answer.
enum Unanswered {
    /// Not a query; nothing is sent back.
    Malformed,
    /// SERVFAIL is sent back.
    Failed(Vec<u8>),
}

/// An error response to `request` (REFUSED, SERVFAIL), encoded.
fn error_response(request: &Request, protocol: Protocol, code: ResponseCode) -> Option<Vec<u8>> {
    let response =
        MessageResponseBuilder::new(&request.queries, None).error_msg(&request.metadata, code);
    encode(response, protocol).ok().map(|(_, bytes)| bytes)
}

/// Parses `bytes` as a query from `src`; `None` if it is not one. A
/// response is never answered (that would make the resolver a reflector).
fn parse(bytes: Vec<u8>, src: SocketAddr, protocol: Protocol) -> Option<Request> {
    let request = Request::from_bytes(bytes, src, protocol).ok()?;
    (request.metadata.message_type == MessageType::Query).then_some(request)
}

/// Answers one query through the catalog, within the query deadline.
async fn answer(shared: &Shared, request: &Request) -> Result<Vec<u8>, Unanswered> {
    let reply = Reply::new(request.protocol());
    let catalog = shared.catalog();
    let done = timeout(
        shared.config.limits.query_timeout,
        catalog.handle_request::<_, TokioTime>(request, reply.clone()),
    )
    .await;
    match (done, reply.take()) {
        (Ok(_), Some(bytes)) => {
            Counters::add(&shared.counters.answered);
            Ok(bytes)
        }
        _ => {
            Counters::add(&shared.counters.timed_out);
            debug!(src = %request.src(), "DNS query not answered in time: SERVFAIL");
            error_response(request, request.protocol(), ResponseCode::ServFail)
                .map_or(Err(Unanswered::Malformed), |b| Err(Unanswered::Failed(b)))
        }
    }
}

fn reap(set: &mut JoinSet<()>) {
    while set.try_join_next().is_some() {}
}

/// What waiting for the next datagram or connection gave.
enum Next<T> {
    Got(T),
    /// The receive or accept failed, and the back-off has been waited.
    Failed,
    /// `stop` changed: the loop ends.
    Stop,
}

/// Waits for `next` unless `stop` changes first. A failed receive or
/// accept (e.g. EMFILE) is logged and waited out for [`ERROR_BACKOFF`],
/// so the loop does not spin on it.
async fn next_or_stop<T>(
    next: impl Future<Output = std::io::Result<T>>,
    stop: &mut watch::Receiver<bool>,
    what: &'static str,
) -> Next<T> {
    let r = tokio::select! {
        r = next => r,
        _ = stop.changed() => return Next::Stop,
    };
    match r {
        Ok(t) => Next::Got(t),
        Err(e) => {
            debug!(error = %e, "DNS {what} failed");
            tokio::time::sleep(ERROR_BACKOFF).await;
            Next::Failed
        }
    }
}

/// Why a query does not reach hickory.
enum Turned {
    /// Longer than the limit, or not a DNS query.
    Malformed,
    /// From a source this exit node does not serve: over UDP with the
    /// query, to answer REFUSED; over TCP `None`, and the connection is
    /// closed without a word.
    NotServed(Option<Box<Request>>),
}

/// Whether a query of `len` bytes is over the limit; counted as malformed.
fn too_long(shared: &Shared, len: usize) -> bool {
    let over = len > shared.config.limits.max_query_len;
    if over {
        Counters::add(&shared.counters.malformed);
    }
    over
}

/// The one admission path of every query, UDP or TCP, before hickory:
/// the size, the source (over TCP before the query is parsed, as nothing
/// is answered there), then the form. Counts what it turns away.
fn admit(
    shared: &Shared,
    bytes: Vec<u8>,
    src: SocketAddr,
    protocol: Protocol,
) -> Result<Request, Turned> {
    if too_long(shared, bytes.len()) {
        return Err(Turned::Malformed);
    }
    let served = shared.allowed.contains(src.ip());
    if !served && protocol == Protocol::Tcp {
        Counters::add(&shared.counters.refused_connections);
        return Err(Turned::NotServed(None));
    }
    let Some(request) = parse(bytes, src, protocol) else {
        Counters::add(&shared.counters.malformed);
        return Err(Turned::Malformed);
    };
    if !served {
        Counters::add(&shared.counters.refused);
        return Err(Turned::NotServed(Some(Box::new(request))));
    }
    Ok(request)
}

/// Serves one UDP socket until `stop` changes; then ends the queries in
/// flight and closes the socket before returning.
pub(super) async fn udp(sock: UdpSocket, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let sock = Arc::new(sock);
    let limits = shared.config.limits;
    // One byte more than the limit tells an oversized datagram apart.
    let mut buf = vec![0u8; limits.max_query_len + 1];
    let mut in_flight = JoinSet::new();
    loop {
        let (n, src) = match next_or_stop(sock.recv_from(&mut buf), &mut stop, "receive").await {
            Next::Got(r) => r,
            Next::Failed => continue,
            Next::Stop => break,
        };
        reap(&mut in_flight);
        let request = match admit(&shared, buf[..n].to_vec(), src, Protocol::Udp) {
            Ok(r) => r,
            Err(Turned::NotServed(Some(request))) => {
                // Safe to answer: the reply is no larger than the query,
                // and on the WireGuard interface the source is
                // authenticated.
                debug!(%src, "DNS query from a source this exit node does not serve: REFUSED");
                if let Some(bytes) = error_response(&request, Protocol::Udp, ResponseCode::Refused)
                {
                    let _ = sock.try_send_to(&bytes, src);
                }
                continue;
            }
            Err(_) => continue,
        };
        let client = shared.clients.of(src.ip());
        if !client.admit(Instant::now()) {
            Counters::add(&shared.counters.rate_limited);
            continue;
        }
        // The client's own share first: a client at its bound takes
        // nothing of everyone's.
        let Ok(own) = Arc::clone(&client.in_flight).try_acquire_owned() else {
            Counters::add(&shared.counters.overloaded);
            continue;
        };
        let Ok(permit) = Arc::clone(&shared.in_flight).try_acquire_owned() else {
            Counters::add(&shared.counters.overloaded);
            continue;
        };
        let (shared, sock) = (Arc::clone(&shared), Arc::clone(&sock));
        in_flight.spawn(async move {
            let _permits = (own, permit);
            let bytes = match answer(&shared, &request).await {
                Ok(b) | Err(Unanswered::Failed(b)) => b,
                Err(Unanswered::Malformed) => return,
            };
            if let Err(e) = sock.send_to(&bytes, src).await {
                debug!(%src, error = %e, "DNS answer not sent");
            }
        });
    }
    // Every task holding the socket ends before it is dropped here.
    in_flight.shutdown().await;
}

/// Serves one TCP listener until `stop` changes; then closes every
/// connection and the listener before returning.
pub(super) async fn tcp(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        let (stream, src) = match next_or_stop(listener.accept(), &mut stop, "accept").await {
            Next::Got(r) => r,
            Next::Failed => continue,
            Next::Stop => break,
        };
        reap(&mut connections);
        if !shared.allowed.contains(src.ip()) {
            Counters::add(&shared.counters.refused_connections);
            debug!(%src, "DNS connection from a source this exit node does not serve: closed");
            continue;
        }
        let client = shared.clients.of(src.ip());
        let Ok(own) = Arc::clone(&client.tcp).try_acquire_owned() else {
            Counters::add(&shared.counters.overloaded_connections);
            continue;
        };
        let Ok(permit) = Arc::clone(&shared.connections).try_acquire_owned() else {
            Counters::add(&shared.counters.overloaded_connections);
            continue;
        };
        let shared = Arc::clone(&shared);
        connections.spawn(async move {
            let _permits = (own, permit);
            if let Err(why) = connection(stream, src, &shared).await {
                debug!(%src, why, "DNS connection closed");
            }
        });
    }
    connections.shutdown().await;
}

/// One TCP connection: length-prefixed queries one after the other
/// (RFC 7766), each within the idle deadline, until the client closes,
/// stops being served, or breaks a bound.
async fn connection(
    mut stream: TcpStream,
    src: SocketAddr,
    shared: &Shared,
) -> Result<(), &'static str> {
    let limits = shared.config.limits;
    loop {
        let mut len = [0u8; 2];
        match timeout(limits.tcp_idle_timeout, stream.read_exact(&mut len)).await {
            Err(_) => return Err("idle"),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(_)) => return Err("read failed"),
            Ok(Ok(_)) => {}
        }
        let len = usize::from(u16::from_be_bytes(len));
        // Checked before the body is read, so no more is ever allocated.
        if too_long(shared, len) {
            return Err("query too long");
        }
        let mut body = vec![0u8; len];
        match timeout(limits.tcp_idle_timeout, stream.read_exact(&mut body)).await {
            Ok(Ok(_)) => {}
            Err(_) => return Err("idle in a query"),
            Ok(Err(_)) => return Err("read failed"),
        }
        let request = match admit(shared, body, src, Protocol::Tcp) {
            Ok(r) => r,
            Err(Turned::NotServed(_)) => return Err("no longer served"),
            Err(Turned::Malformed) => return Err("not a query"),
        };
        let client = shared.clients.of(src.ip());
        if !client.admit(Instant::now()) {
            Counters::add(&shared.counters.rate_limited);
            return Err("over the client's query rate");
        }
        let slot = timeout(limits.query_timeout, async {
            let own = Arc::clone(&client.in_flight).acquire_owned().await?;
            let all = Arc::clone(&shared.in_flight).acquire_owned().await?;
            Ok::<_, tokio::sync::AcquireError>((own, all))
        })
        .await;
        let bytes = match slot {
            Ok(Ok(_permits)) => match answer(shared, &request).await {
                Ok(b) | Err(Unanswered::Failed(b)) => b,
                Err(Unanswered::Malformed) => return Err("unanswerable"),
            },
            _ => {
                Counters::add(&shared.counters.timed_out);
                error_response(&request, Protocol::Tcp, ResponseCode::ServFail)
                    .ok_or("unanswerable")?
            }
        };
        let Ok(len) = u16::try_from(bytes.len()) else {
            return Err("answer too long");
        };
        let mut framed = Vec::with_capacity(bytes.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&bytes);
        match timeout(limits.tcp_idle_timeout, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            _ => return Err("write failed"),
        }
    }
}
