//! An authoritative DNS server on loopback, for tests of backends given by name: it answers A,
//! AAAA and SRV queries over UDP and TCP from records the test changes while traffic flows,
//! misbehaves per name on demand (NXDOMAIN, SERVFAIL, no answer at all, an empty answer), and
//! counts the queries each name receives, so a test sees when the balancer re-resolves.
//!
//! Messages are encoded and decoded by hickory-proto, so what the resolver under test reads is
//! real wire format, truncation included.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinEncodable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::{CancellationToken, DropGuard};

/// How many UDP ports [`DnsServer::start`] tries before giving up on finding one whose TCP
/// twin is free.
const BIND_TRIES: usize = 10;
/// The UDP payload the server advertises in its own OPT record: the size the DNS flag day of
/// 2020 settled on, which needs no IP fragmentation.
const EDNS_PAYLOAD: u16 = 1232;
/// The largest message a TCP length prefix can announce.
const TCP_MAX: usize = u16::MAX as usize;

/// How the server treats the queries for one name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DnsMode {
    /// Answers from the name's records; NXDOMAIN if it has none.
    #[default]
    Answer,
    /// NXDOMAIN, whatever records the name has.
    NxDomain,
    /// SERVFAIL, as a server whose upstream or zone is broken answers.
    ServFail,
    /// Drops the query: the resolver waits until it times out.
    Silent,
    /// NOERROR with no records, as for a name that exists without records of the type asked.
    Empty,
}

/// One SRV record as [`DnsServer::set_srv`] takes it: priority, weight, port, target.
pub type SrvRecord<'a> = (u16, u16, u16, &'a str);

/// A DNS server on an ephemeral port of 127.0.0.1, UDP and TCP on the same port, serving in
/// tasks of the test's runtime until it is dropped.
#[derive(Debug)]
pub struct DnsServer {
    /// Where it answers, over UDP and TCP alike: the nameserver to point a resolver at.
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    /// Ends the serving tasks (and every open TCP connection) when the server is dropped.
    _stop: DropGuard,
}

impl DnsServer {
    /// Binds UDP on an ephemeral loopback port, then TCP on the same port (trying other ports
    /// if another socket already holds that one over TCP), and starts serving. Must be called
    /// inside a tokio runtime.
    pub async fn start() -> DnsServer {
        let (udp, tcp) = bind().await;
        let addr = udp.local_addr().expect("DNS server address");
        let zone = Arc::new(Mutex::new(Zone::default()));
        let stop = CancellationToken::new();
        tokio::spawn(serve_udp(udp, Arc::clone(&zone), stop.clone()));
        tokio::spawn(serve_tcp(tcp, Arc::clone(&zone), stop.clone()));
        DnsServer {
            addr,
            zone,
            _stop: stop.drop_guard(),
        }
    }

    /// Replaces the address records of `name`: the IPv4 addresses of `addrs` become its A
    /// records, the IPv6 ones its AAAA records, all with `ttl`. An empty `addrs` removes them.
    pub fn set_a(&self, name: &str, addrs: &[IpAddr], ttl: u32) {
        let name = parse_name(name);
        let mut zone = self.zone();
        let entry = zone.names.entry(key(&name)).or_default();
        entry.addrs = addrs.to_vec();
        entry.addr_ttl = ttl;
    }

    /// Replaces the SRV records of `name` with `records`, all with `ttl`. An empty `records`
    /// removes them.
    pub fn set_srv(&self, name: &str, records: &[SrvRecord<'_>], ttl: u32) {
        let name = parse_name(name);
        let records = records
            .iter()
            .map(|&(priority, weight, port, target)| {
                SRV::new(priority, weight, port, parse_name(target))
            })
            .collect();
        let mut zone = self.zone();
        let entry = zone.names.entry(key(&name)).or_default();
        entry.srv = records;
        entry.srv_ttl = ttl;
    }

    /// Sets how queries for `name` are treated from now on; its records are kept, so going
    /// back to [`DnsMode::Answer`] serves them again.
    pub fn set_mode(&self, name: &str, mode: DnsMode) {
        let name = parse_name(name);
        self.zone().names.entry(key(&name)).or_default().mode = mode;
    }

    /// How many queries for `name`, of any type and over either transport, have arrived,
    /// including those the server did not answer ([`DnsMode::Silent`]).
    pub fn queries(&self, name: &str) -> u64 {
        let name = parse_name(name);
        self.zone().queries.get(&key(&name)).copied().unwrap_or(0)
    }

    fn zone(&self) -> std::sync::MutexGuard<'_, Zone> {
        // A test that panicked while holding the lock left whole records behind.
        self.zone.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Binds the UDP socket at port 0 and the TCP listener on the port UDP got.
async fn bind() -> (UdpSocket, TcpListener) {
    for _ in 0..BIND_TRIES {
        let udp = UdpSocket::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind the DNS server's UDP socket on loopback: {e}"));
        let addr = udp.local_addr().expect("DNS server's UDP address");
        match TcpListener::bind(addr).await {
            Ok(tcp) => return (udp, tcp),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => panic!("bind the DNS server's TCP listener on {addr}: {e}"),
        }
    }
    panic!("no loopback port was free over both UDP and TCP in {BIND_TRIES} tries");
}

/// A name as given by a test, absolute whether or not it ends with a dot.
fn parse_name(name: &str) -> Name {
    let mut parsed =
        Name::from_ascii(name).unwrap_or_else(|e| panic!("{name:?} is not a DNS name: {e}"));
    parsed.set_fqdn(true);
    parsed
}

/// What a name is filed under: lowercase, no trailing dot, so that names match as DNS
/// matches them.
fn key(name: &Name) -> String {
    name.to_lowercase()
        .to_string()
        .trim_end_matches('.')
        .to_owned()
}

/// The records and modes the server answers from, and what it has been asked.
#[derive(Debug, Default)]
struct Zone {
    names: HashMap<String, Entry>,
    queries: HashMap<String, u64>,
}

/// Everything the server holds for one name.
#[derive(Debug, Default)]
struct Entry {
    /// A and AAAA records, in the order the test gave them.
    addrs: Vec<IpAddr>,
    addr_ttl: u32,
    srv: Vec<SRV>,
    srv_ttl: u32,
    mode: DnsMode,
}

impl Entry {
    /// Whether the name exists: a name with no records at all is NXDOMAIN.
    fn exists(&self) -> bool {
        !self.addrs.is_empty() || !self.srv.is_empty()
    }

    /// Address records of `kind` (A or AAAA) owned by `owner`.
    fn addr_records(&self, owner: &Name, kind: RecordType) -> impl Iterator<Item = Record> {
        let owner = owner.clone();
        let ttl = self.addr_ttl;
        self.addrs.iter().filter_map(move |addr| {
            let data = match (addr, kind) {
                (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                _ => return None,
            };
            Some(Record::from_rdata(owner.clone(), ttl, data))
        })
    }
}

/// What the server does with one question.
enum Reply {
    /// Nothing: the query is dropped.
    Drop,
    /// A response with this code and these answer and additional records.
    Respond {
        code: ResponseCode,
        answers: Vec<Record>,
        additionals: Vec<Record>,
    },
}

impl Reply {
    fn code(code: ResponseCode) -> Reply {
        Reply::Respond {
            code,
            answers: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

impl Zone {
    /// Counts `question` and decides the reply to it.
    fn reply(&mut self, question: &Query) -> Reply {
        let name = key(question.name());
        *self.queries.entry(name.clone()).or_default() += 1;
        let Some(entry) = self.names.get(&name) else {
            return Reply::code(ResponseCode::NXDomain);
        };
        match entry.mode {
            DnsMode::Silent => return Reply::Drop,
            DnsMode::NxDomain => return Reply::code(ResponseCode::NXDomain),
            DnsMode::ServFail => return Reply::code(ResponseCode::ServFail),
            DnsMode::Empty => return Reply::code(ResponseCode::NoError),
            DnsMode::Answer if !entry.exists() => return Reply::code(ResponseCode::NXDomain),
            DnsMode::Answer => {}
        }
        // Answers carry the name as the question spelled it, as servers echo it.
        let owner = question.name();
        let mut answers = Vec::new();
        let mut additionals = Vec::new();
        match question.query_type() {
            kind @ (RecordType::A | RecordType::AAAA) => {
                answers.extend(entry.addr_records(owner, kind));
            }
            RecordType::SRV => {
                for srv in &entry.srv {
                    answers.push(Record::from_rdata(
                        owner.clone(),
                        entry.srv_ttl,
                        RData::SRV(srv.clone()),
                    ));
                }
                additionals = self.glue(&entry.srv);
            }
            // The name exists, with no records of the type asked: NOERROR, no answers.
            _ => {}
        }
        Reply::Respond {
            code: ResponseCode::NoError,
            answers,
            additionals,
        }
    }

    /// The address records this server holds for the targets of `srv`, each target once: what
    /// an authoritative server adds so that a resolver need not ask for them. Targets the test
    /// made misbehave are left out, as their own queries would fail.
    fn glue(&self, srv: &[SRV]) -> Vec<Record> {
        let mut seen = Vec::new();
        let mut records = Vec::new();
        for target in srv.iter().map(SRV::target) {
            let name = key(target);
            if seen.contains(&name) {
                continue;
            }
            if let Some(entry) = self.names.get(&name)
                && entry.mode == DnsMode::Answer
            {
                records.extend(entry.addr_records(target, RecordType::A));
                records.extend(entry.addr_records(target, RecordType::AAAA));
            }
            seen.push(name);
        }
        records
    }
}

/// The encoded response to `packet`, if the server answers it: not to a packet that is no
/// DNS query, nor to a question for a [`DnsMode::Silent`] name.
fn respond(zone: &Mutex<Zone>, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let query = Message::from_bytes(packet).ok()?;
    if query.message_type() != MessageType::Query {
        return None;
    }
    let mut response = Message::new();
    response
        .set_header(Header::response_from_request(query.header()))
        .set_authoritative(true)
        .add_queries(query.queries().iter().cloned());
    if query.extensions().is_some() {
        // RFC 6891: a server that understands EDNS answers a query with OPT with OPT.
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        response.set_edns(edns);
    }
    let reply = match (query.op_code(), query.queries()) {
        (OpCode::Query, [question]) => zone
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reply(question),
        (OpCode::Query, _) => Reply::code(ResponseCode::FormErr),
        _ => Reply::code(ResponseCode::NotImp),
    };
    let Reply::Respond {
        code,
        answers,
        additionals,
    } = reply
    else {
        return None;
    };
    response
        .set_response_code(code)
        .add_answers(answers)
        .add_additionals(additionals);
    let limit = match transport {
        // 512 bytes, or the payload size the query's OPT record advertises.
        Transport::Udp => usize::from(query.max_payload()),
        Transport::Tcp => TCP_MAX,
    };
    encode(response, limit)
}

/// Which transport a query came over, for the size its response may take.
#[derive(Clone, Copy)]
enum Transport {
    Udp,
    Tcp,
}

/// Encodes `response` within `limit` bytes: whole if it fits; else without the additional
/// section, which is optional (RFC 2181 §9: its loss does not set TC); else with the question
/// alone and TC set, so that the resolver asks again over TCP.
fn encode(mut response: Message, limit: usize) -> Option<Vec<u8>> {
    let whole = response.to_bytes().ok()?;
    if whole.len() <= limit {
        return Some(whole);
    }
    response.take_additionals();
    let without_additionals = response.to_bytes().ok()?;
    if without_additionals.len() <= limit {
        return Some(without_additionals);
    }
    response.take_answers();
    response.take_name_servers();
    response.set_truncated(true);
    response.to_bytes().ok()
}

/// Answers UDP queries until `stop` is cancelled. A packet that is no DNS query is ignored.
async fn serve_udp(socket: UdpSocket, zone: Arc<Mutex<Zone>>, stop: CancellationToken) {
    // Big enough for any datagram, so that no query is cut short and misparsed.
    let mut buf = vec![0; 65_535];
    loop {
        let received = tokio::select! {
            () = stop.cancelled() => return,
            received = socket.recv_from(&mut buf) => received,
        };
        let (len, peer) = match received {
            Ok(received) => received,
            Err(e) => {
                eprintln!("DNS server: UDP receive failed: {e}");
                continue;
            }
        };
        if let Some(response) = respond(&zone, &buf[..len], Transport::Udp)
            && let Err(e) = socket.send_to(&response, peer).await
        {
            eprintln!("DNS server: UDP send to {peer} failed: {e}");
        }
    }
}

/// Accepts TCP connections until `stop` is cancelled, serving each in its own task, which
/// ends with `stop` too.
async fn serve_tcp(listener: TcpListener, zone: Arc<Mutex<Zone>>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let zone = Arc::clone(&zone);
                let stop = stop.clone();
                tokio::spawn(async move {
                    stop.run_until_cancelled(serve_connection(stream, &zone))
                        .await;
                });
            }
            Err(e) => eprintln!("DNS server: TCP accept failed: {e}"),
        }
    }
}

/// Answers the length-prefixed queries of one TCP connection, in order, until the client
/// closes it. A message that is no DNS query is skipped; a silent name's query gets nothing.
async fn serve_connection(mut stream: TcpStream, zone: &Mutex<Zone>) {
    loop {
        let mut prefix = [0; 2];
        if stream.read_exact(&mut prefix).await.is_err() {
            return;
        }
        let mut query = vec![0; usize::from(u16::from_be_bytes(prefix))];
        if stream.read_exact(&mut query).await.is_err() {
            return;
        }
        let Some(response) = respond(zone, &query, Transport::Tcp) else {
            continue;
        };
        let Ok(len) = u16::try_from(response.len()) else {
            continue;
        };
        let mut framed = Vec::with_capacity(2 + response.len());
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&response);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}
