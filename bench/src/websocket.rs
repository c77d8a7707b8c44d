//! `--ws`: MQTT over WebSocket, Axion's `/mqtt` (on the WebSocket port of
//! `axion serve`) beside Mosquitto's `protocol websockets` listener, in one
//! run, rounds alternating; plain TCP on each broker in the same rounds as
//! the reference.
//!
//! One publisher → one subscriber on a fresh topic, MQTT 3.1.1, flat out:
//! QoS 0, and QoS 1 with 100 publishes in flight. The client is this
//! module's own, the same over both transports so that only the transport
//! differs: MQTT packets from rumqttc's codec, one packet per binary frame
//! over WebSocket as MQTT.js and paho send them (tokio-tungstenite, the
//! `mqtt` subprotocol), and the same packets written to a socket over TCP.
//! Each broker's CPU comes from /proc/<pid>/stat.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::{axion_serve_on, cpu_secs, free_port, median, spawn_mosquitto, Args, Outcome};

/// Largest packet either side reads.
const MAX_PACKET: usize = 1024 * 1024;
/// QoS 1 publishes in flight, as the TCP benchmark's rumqttc clients.
const INFLIGHT: usize = 100;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    AxionWs,
    MosquittoWs,
    AxionTcp,
    MosquittoTcp,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::AxionWs => "axion",
            Target::MosquittoWs => "mosquitto",
            Target::AxionTcp => "axion",
            Target::MosquittoTcp => "mosquitto",
        }
    }

    fn transport(self) -> &'static str {
        match self {
            Target::AxionWs | Target::MosquittoWs => "WebSocket",
            Target::AxionTcp | Target::MosquittoTcp => "TCP",
        }
    }
}

/// A broker listening on TCP and WebSocket, killed on drop.
struct Running {
    child: std::process::Child,
    tcp: u16,
    ws: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(target: Target, args: &Args) -> anyhow::Result<Running> {
    let dir = tempfile::tempdir()?;
    let (tcp, ws) = (free_port()?, free_port()?);
    let child = match target {
        Target::AxionWs | Target::AxionTcp => axion_serve_on(&args.axion, tcp, ws, dir.path())?
            .spawn()
            .with_context(|| format!("spawn {} (cargo build --release)", args.axion.display()))?,
        Target::MosquittoWs | Target::MosquittoTcp => spawn_mosquitto(
            &dir.path().join("m.conf"),
            tcp,
            0,
            &format!("persistence false\nlistener {ws} 127.0.0.1\nprotocol websockets\n"),
        )?,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    for port in [tcp, ws] {
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("{target:?} did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(Running {
        child,
        tcp,
        ws,
        _dir: dir,
    })
}

type Ws = WebSocketStream<TcpStream>;

/// The sending half of a connection.
enum Tx {
    Ws(SplitSink<Ws, Message>),
    Tcp(BufWriter<OwnedWriteHalf>),
}

/// The receiving half, with the bytes read and not yet parsed.
struct Rx {
    inner: RxInner,
    buf: BytesMut,
}

enum RxInner {
    Ws(SplitStream<Ws>),
    Tcp(OwnedReadHalf),
}

impl Tx {
    /// Queues one packet: one binary frame over WebSocket.
    async fn send(&mut self, packet: &Packet) -> anyhow::Result<()> {
        let mut out = BytesMut::new();
        packet.write(&mut out, MAX_PACKET)?;
        match self {
            Tx::Ws(sink) => sink.feed(Message::Binary(out.freeze())).await?,
            Tx::Tcp(w) => w.write_all(&out).await?,
        }
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        match self {
            Tx::Ws(sink) => sink.flush().await?,
            Tx::Tcp(w) => w.flush().await?,
        }
        Ok(())
    }
}

impl Rx {
    /// The next packet; `None` once the connection has ended.
    async fn next(&mut self) -> anyhow::Result<Option<Packet>> {
        loop {
            match Packet::read(&mut self.buf, MAX_PACKET) {
                Ok(packet) => return Ok(Some(packet)),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => bail!("bad packet from the broker: {e:?}"),
            }
            match &mut self.inner {
                RxInner::Ws(stream) => match stream.next().await {
                    Some(Ok(Message::Binary(b))) => self.buf.extend_from_slice(&b),
                    Some(Ok(Message::Close(_))) | None => return Ok(None),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.into()),
                },
                RxInner::Tcp(r) => {
                    // Room for a large read, as tungstenite's own buffer
                    // gives the WebSocket side (an empty BytesMut reads 64
                    // bytes at a time).
                    self.buf.reserve(64 * 1024);
                    if r.read_buf(&mut self.buf).await? == 0 {
                        return Ok(None);
                    }
                }
            }
        }
    }
}

/// Connects (MQTT 3.1.1, clean session) and waits for the CONNACK.
async fn connect(target: Target, run: &Running, id: &str) -> anyhow::Result<(Tx, Rx)> {
    let port = match target {
        Target::AxionWs | Target::MosquittoWs => run.ws,
        Target::AxionTcp | Target::MosquittoTcp => run.tcp,
    };
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let (mut tx, mut rx) = match target {
        Target::AxionWs | Target::MosquittoWs => {
            let mut request = format!("ws://127.0.0.1:{port}/mqtt").into_client_request()?;
            request
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", "mqtt".parse()?);
            let (ws, _) = tokio_tungstenite::client_async(request, tcp).await?;
            let (sink, stream) = ws.split();
            (
                Tx::Ws(sink),
                Rx {
                    inner: RxInner::Ws(stream),
                    buf: BytesMut::new(),
                },
            )
        }
        Target::AxionTcp | Target::MosquittoTcp => {
            let (r, w) = tcp.into_split();
            (
                Tx::Tcp(BufWriter::with_capacity(64 * 1024, w)),
                Rx {
                    inner: RxInner::Tcp(r),
                    buf: BytesMut::new(),
                },
            )
        }
    };
    let mut connect = Connect::new(id);
    connect.keep_alive = 60;
    tx.send(&Packet::Connect(connect)).await?;
    tx.flush().await?;
    match rx.next().await? {
        Some(Packet::ConnAck(ack))
            if ack.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success =>
        {
            Ok((tx, rx))
        }
        other => bail!("{target:?}: no CONNACK but {other:?}"),
    }
}

/// One flat-out publisher → subscriber run of `count` messages.
async fn run_case(
    target: Target,
    run: &Running,
    qos: QoS,
    count: u64,
    payload: usize,
) -> anyhow::Result<Outcome> {
    let pid = run.child.id();
    let topic = format!("bench/ws/{}", free_port()?);
    let base = Instant::now();
    let (mut sub_tx, mut sub_rx) =
        connect(target, run, &format!("ws-sub-{}", free_port()?)).await?;
    let mut subscribe = Subscribe::new(&topic, qos);
    subscribe.pkid = 1;
    sub_tx.send(&Packet::Subscribe(subscribe)).await?;
    sub_tx.flush().await?;
    loop {
        match sub_rx.next().await? {
            Some(Packet::SubAck(_)) => break,
            Some(_) => {}
            None => bail!("{target:?}: closed before SUBACK"),
        }
    }
    let received = Arc::new(AtomicU64::new(0));
    let seen = received.clone();
    let subscriber = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(count as usize);
        while seen.load(Ordering::Relaxed) < count {
            let Some(packet) = sub_rx.next().await? else {
                break;
            };
            if let Packet::Publish(p) = packet {
                if p.payload.len() >= 8 {
                    let sent = u64::from_be_bytes(p.payload[..8].try_into().unwrap_or([0; 8]));
                    latencies.push((base.elapsed().as_nanos() as u64).saturating_sub(sent));
                }
                seen.fetch_add(1, Ordering::Relaxed);
                if p.qos == QoS::AtLeastOnce {
                    sub_tx.send(&Packet::PubAck(PubAck::new(p.pkid))).await?;
                    // Acknowledgements go out with what is already read:
                    // one flush per batch the broker sent, not per message.
                    if sub_rx.buf.is_empty() {
                        sub_tx.flush().await?;
                    }
                }
            }
        }
        Ok::<_, anyhow::Error>(latencies)
    });

    let (mut pub_tx, mut pub_rx) =
        connect(target, run, &format!("ws-pub-{}", free_port()?)).await?;
    let window = Arc::new(tokio::sync::Semaphore::new(INFLIGHT));
    let credit = window.clone();
    // PUBACKs come back on the publisher's own connection.
    let acks = tokio::spawn(async move {
        while let Some(packet) = pub_rx.next().await? {
            if let Packet::PubAck(_) = packet {
                credit.add_permits(1);
            }
        }
        Ok::<_, anyhow::Error>(())
    });
    let cpu0 = cpu_secs(pid);
    let start = Instant::now();
    let mut body = vec![0u8; payload.max(8)];
    let mut pkid: u16 = 0;
    for i in 0..count {
        if qos == QoS::AtLeastOnce {
            let permit = match window.try_acquire() {
                Ok(p) => p,
                Err(_) => {
                    // Window full: what is queued goes out, then wait for acks.
                    pub_tx.flush().await?;
                    window.acquire().await?
                }
            };
            permit.forget();
        }
        let now = base.elapsed().as_nanos() as u64;
        body[..8].copy_from_slice(&now.to_be_bytes());
        let mut publish = Publish::new(&topic, qos, Bytes::copy_from_slice(&body));
        if qos != QoS::AtMostOnce {
            pkid = pkid % u16::MAX + 1;
            publish.pkid = pkid;
        }
        pub_tx.send(&Packet::Publish(publish)).await?;
        if i % 64 == 63 {
            pub_tx.flush().await?;
        }
    }
    pub_tx.flush().await?;
    // QoS 0 may lose messages: wait for all, or until nothing has arrived for a second.
    let mut last = received.load(Ordering::Relaxed);
    let mut idle_since = Instant::now();
    while received.load(Ordering::Relaxed) < count {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = received.load(Ordering::Relaxed);
        if now != last {
            last = now;
            idle_since = Instant::now();
        } else if idle_since.elapsed() > Duration::from_secs(1) {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let broker_cpu = cpu_secs(pid) - cpu0;
    let got = received.load(Ordering::Relaxed);
    acks.abort();
    let lat = if got >= count {
        subscriber.await??
    } else {
        subscriber.abort();
        Vec::new()
    };
    Ok(Outcome::from_latencies(count, got, secs, lat, broker_cpu))
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let n = args.messages;
    let cases = [
        ("QoS0 1→1 64 B", QoS::AtMostOnce, n, args.payload),
        ("QoS1 1→1 64 B", QoS::AtLeastOnce, n, args.payload),
        ("QoS0 1→1 1 KiB", QoS::AtMostOnce, n / 2, 1024),
        ("QoS1 1→1 1 KiB", QoS::AtLeastOnce, n / 2, 1024),
    ];
    println!("| case | broker | transport | delivered | msg/s | p50 ms | p99 ms | broker CPU s | msg per broker CPU-s |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut summary = Vec::new();
    for (name, qos, count, payload) in cases {
        let mut results: Vec<(Target, Outcome)> = Vec::new();
        for round in 0..args.rounds {
            // Alternate which goes first, so drift hits all alike.
            let mut order = vec![
                Target::AxionWs,
                Target::MosquittoWs,
                Target::AxionTcp,
                Target::MosquittoTcp,
            ];
            let len = order.len();
            order.rotate_left(round % len);
            for target in order {
                let running = start(target, args)?;
                let outcome = rt.block_on(run_case(target, &running, qos, count, payload))?;
                eprintln!(
                    "  {name} round {} {target:?}: {}",
                    round + 1,
                    outcome.summary()
                );
                results.push((target, outcome));
            }
        }
        let pick = |t: Target| {
            let v: Vec<Outcome> = results
                .iter()
                .filter(|(target, _)| *target == t)
                .map(|(_, o)| *o)
                .collect();
            median(v, |o| o.rate())
        };
        for target in [
            Target::AxionWs,
            Target::MosquittoWs,
            Target::AxionTcp,
            Target::MosquittoTcp,
        ] {
            let o = pick(target);
            println!(
                "| {name} | {} | {} | {} |",
                target.name(),
                target.transport(),
                o.cells()
            );
        }
        summary.push((
            name,
            pick(Target::AxionWs),
            pick(Target::MosquittoWs),
            pick(Target::AxionTcp),
        ));
    }
    println!();
    println!("| case | over WebSocket, axion ÷ mosquitto | axion, WebSocket ÷ TCP |");
    println!("|---|---|---|");
    for (name, a, m, t) in summary {
        println!(
            "| {name} | throughput {:.2}×, messages per broker CPU-second {:.2}× | throughput {:.2}×, messages per broker CPU-second {:.2}× |",
            a.rate() / m.rate(),
            a.per_cpu_sec() / m.per_cpu_sec(),
            a.rate() / t.rate(),
            a.per_cpu_sec() / t.per_cpu_sec()
        );
    }
    Ok(())
}
