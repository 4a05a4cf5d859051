//! Session pools with `pooler.kernel_relay`: once a client has its server
//! connection, the kernel relays the bytes (a BPF sockhash and `sk_skb`
//! program); the pooler takes the pair back when the session ends or it
//! must speak. Real PostgreSQL 15, real clients (tokio-postgres, psql,
//! pgbench).

mod support;

use std::{
    net::SocketAddr,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use farol_agent::{config::PoolMode, pooler::kernel_relay::KernelRelaySnapshot};
use support::pooler::{self as harness, can_run_postgres, cluster, connect, simple_rows, sqlstate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start(pg: &xtask::postgres::PgCluster, pool_size: usize) -> harness::PoolerGuard {
    let mut config = harness::config(pg, harness::pool(PoolMode::Session, pool_size));
    config.kernel_relay = true;
    let pooler = harness::start(config).await;
    let snapshot = relay(&pooler);
    assert!(
        snapshot.available,
        "the kernel relay loads as root (is the eBPF object built? cargo xtask build-ebpf)"
    );
    pooler
}

fn relay(pooler: &harness::PoolerGuard) -> KernelRelaySnapshot {
    pooler
        .pooler
        .kernel_relay_snapshot()
        .expect("kernel_relay is on")
}

/// Polls `probe` until it holds or `within` passes.
async fn eventually(within: Duration, mut probe: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if probe() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    probe()
}

fn backend_pid(row: &tokio_postgres::Row) -> i32 {
    row.get::<_, i32>(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_large_rows_and_copy_cross_the_kernel_and_the_server_is_reused() {
    if !can_run_postgres("queries_large_rows_and_copy_cross_the_kernel_and_the_server_is_reused") {
        return;
    }
    use futures_util::{SinkExt, TryStreamExt};
    let pg = cluster(false);
    let pooler = start(&pg, 1).await;
    let client = connect(pooler.addr).await;
    client
        .batch_execute(
            "DROP TABLE IF EXISTS kr_copy; CREATE TABLE kr_copy (id int, body text); \
             SET application_name = 'dirty'",
        )
        .await
        .unwrap();
    let pid = backend_pid(
        &client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap(),
    );
    let queries_before = pooler.pooler.pools()[0]
        .stats
        .queries
        .load(Ordering::Relaxed);
    // Many small queries, simple and extended.
    for i in 0..200i32 {
        let row = client
            .query_one("SELECT $1::int * 2, pg_backend_pid()", &[&i])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), i * 2);
        assert_eq!(row.get::<_, i32>(1), pid);
    }
    let rows = simple_rows(
        &client
            .simple_query("SELECT 'a', 1; SELECT 'b'")
            .await
            .unwrap(),
    );
    assert_eq!(
        rows,
        vec![vec!["a".to_owned(), "1".to_owned()], vec!["b".to_owned()]]
    );
    // A large row each way.
    let big: String = (0..3_000_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let row = client
        .query_one("SELECT $1::text, length($1::text)", &[&big])
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), big);
    assert_eq!(row.get::<_, i32>(1), 3_000_000);
    // COPY in (many rows), then out.
    let sink = client
        .copy_in("COPY kr_copy (id, body) FROM STDIN")
        .await
        .unwrap();
    let mut sink = std::pin::pin!(sink);
    let mut sent = String::new();
    for i in 0..20_000 {
        sent.push_str(&format!("{i}\trow-{i}-{}\n", "x".repeat(i % 50)));
    }
    sink.send(bytes::Bytes::from(sent.clone())).await.unwrap();
    assert_eq!(sink.as_mut().finish().await.unwrap(), 20_000);
    let out = client
        .copy_out("COPY (SELECT id, body FROM kr_copy ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<bytes::Bytes> = out.try_collect().await.unwrap();
    let received: Vec<u8> = chunks.concat();
    assert_eq!(String::from_utf8(received).unwrap(), sent);
    // An error keeps the session usable.
    let error = client.query("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&error), "22012");
    assert_eq!(
        client
            .query_one("SELECT 7", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        7
    );

    let during = relay(&pooler);
    assert_eq!(during.handovers, 1, "{during:?}");
    assert_eq!(during.sessions, 1, "{during:?}");
    assert!(
        during.bytes > 6_000_000,
        "the big row crossed in the kernel: {during:?}"
    );
    // The pooler saw at most the few statements that came before the
    // handover (none of the 200 below).
    let queries = pooler.pooler.pools()[0]
        .stats
        .queries
        .load(Ordering::Relaxed);
    assert!(
        queries - queries_before < 10,
        "the pooler did not relay the queries itself ({} counted)",
        queries - queries_before
    );

    // Terminate comes back to the pooler: the server is reset and reused.
    drop(client);
    assert!(
        eventually(Duration::from_secs(5), || relay(&pooler)
            .take_backs("terminate")
            == 1)
        .await,
        "{:?}",
        relay(&pooler)
    );
    let next = connect(pooler.addr).await;
    let row = next
        .query_one(
            "SELECT pg_backend_pid(), current_setting('application_name')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(backend_pid(&row), pid, "the same server connection");
    assert_eq!(row.get::<_, &str>(1), "farol", "reset by DISCARD ALL");
    assert_eq!(
        pooler.pooler.pools()[0]
            .stats
            .server_connects
            .load(Ordering::Relaxed),
        1
    );
    let after = relay(&pooler);
    assert_eq!(after.handovers, 2, "{after:?}");
    assert!(after.fallbacks.iter().all(|(_, n)| *n == 0), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_pgbench_with_a_connection_per_transaction_reuse_the_servers() {
    if !can_run_postgres("psql_and_pgbench_with_a_connection_per_transaction_reuse_the_servers") {
        return;
    }
    let pg = cluster(false);
    let pooler = start(&pg, 8).await;
    let port = pooler.addr.port().to_string();
    let out = tokio::process::Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "app",
            "-d",
            "app",
            "-c",
            "SELECT 40 + 2",
            "-c",
            "SELECT string_agg(g::text, ',') FROM generate_series(1, 5) g",
        ])
        .env("PGPASSWORD", harness::APP_PASSWORD)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n1,2,3,4,5\n");

    let script = std::env::temp_dir().join(format!("farol-kr-{}.sql", std::process::id()));
    std::fs::write(&script, "SELECT 1;\n").unwrap();
    let out = tokio::process::Command::new("pgbench")
        .args([
            "-n",
            "-C",
            "-c",
            "4",
            "-j",
            "2",
            "-t",
            "50",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
        ])
        .args(["-U", "app", "-f"])
        .arg(&script)
        .arg("app")
        .env("PGPASSWORD", harness::APP_PASSWORD)
        .output()
        .await
        .unwrap();
    let _ = std::fs::remove_file(&script);
    harness::pgbench_succeeded(&out, "pgbench");
    // 200 connections; those still there after their query's answer are
    // handed to the kernel (a client that already sent its Terminate, or
    // closed, is not), and every one comes back by its Terminate.
    assert!(
        eventually(Duration::from_secs(5), || {
            let snapshot = relay(&pooler);
            snapshot.sessions == 0 && snapshot.take_backs("terminate") == snapshot.handovers
        })
        .await,
        "{:?}",
        relay(&pooler)
    );
    let churned = relay(&pooler);
    assert!(churned.handovers >= 100, "{churned:?}");
    // Prepared statements, one session per client: each hands over once
    // its first statement was answered (a handover while the server is
    // about to answer could lose that answer and hang pgbench).
    std::fs::write(
        &script,
        "\\set aid random(1, 1000)\nSELECT :aid::int + 1;\n",
    )
    .unwrap();
    let run = tokio::process::Command::new("pgbench")
        .args([
            "-n",
            "-M",
            "prepared",
            "-c",
            "8",
            "-j",
            "2",
            "-t",
            "300",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
        ])
        .args(["-U", "app", "-f"])
        .arg(&script)
        .arg("app")
        .env("PGPASSWORD", harness::APP_PASSWORD)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("pgbench -M prepared finishes within 60 s")
        .unwrap();
    let _ = std::fs::remove_file(&script);
    harness::pgbench_succeeded(&out, "pgbench");
    let snapshot = relay(&pooler);
    assert_eq!(snapshot.handovers, churned.handovers + 8, "{snapshot:?}");
    assert_eq!(
        snapshot.unpaired, 0,
        "no buffer lost at a handover: {snapshot:?}"
    );
    let connects = pooler.pooler.pools()[0]
        .stats
        .server_connects
        .load(Ordering::Relaxed);
    assert!(
        connects <= 8,
        "servers reused: {connects} connects for 208 clients"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_query_frees_its_server_and_a_cancel_reaches_it() {
    if !can_run_postgres("a_client_killed_mid_query_frees_its_server_and_a_cancel_reaches_it") {
        return;
    }
    let pg = cluster(false);
    let pooler = start(&pg, 1).await;

    // Cancel while relayed: 57014, and the session goes on.
    let client = connect(pooler.addr).await;
    client.simple_query("SELECT 1").await.unwrap();
    let token = client.cancel_token();
    let started = Instant::now();
    let query = tokio::spawn(async move {
        let result = client.simple_query("SELECT pg_sleep(30)").await;
        (client, result)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (client, result) = query.await.unwrap();
    assert_eq!(sqlstate(&harness::failed(result, "cancelled")), "57014");
    assert!(started.elapsed() < Duration::from_secs(10));
    // Still relayed, still usable.
    assert_eq!(
        simple_rows(&client.simple_query("SELECT 3").await.unwrap()),
        vec![vec!["3".to_owned()]]
    );
    // Handed over just after the answer went out.
    assert!(
        eventually(Duration::from_secs(5), || relay(&pooler).sessions == 1).await,
        "{:?}",
        relay(&pooler)
    );
    drop(client);

    // A client whose connection dies mid-query (no Terminate).
    let (killed, connection) = harness::client_config(pooler.addr, "app", harness::APP_PASSWORD)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    let pid = backend_pid(
        &killed
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap(),
    );
    let sleeping = tokio::spawn(async move { killed.simple_query("SELECT pg_sleep(60)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    driver.abort();
    sleeping.abort();
    // The pooler cancels the query and closes that server; the pool's one
    // slot serves the next client.
    assert!(
        eventually(Duration::from_secs(10), || {
            pg.primary
                .psql(
                    "app",
                    &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
                )
                .map(|n| n == "0")
                .unwrap_or(false)
        })
        .await,
        "backend {pid} ended"
    );
    let next = connect(pooler.addr).await;
    let row = next
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap();
    assert_ne!(backend_pid(&row), pid);
    let snapshot = relay(&pooler);
    assert!(snapshot.take_backs("client_closed") >= 1, "{snapshot:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_session_ends_that_session_only() {
    if !can_run_postgres("a_server_killed_mid_session_ends_that_session_only") {
        return;
    }
    let pg = cluster(false);
    let pooler = start(&pg, 2).await;
    let victim = connect(pooler.addr).await;
    let pid = backend_pid(
        &victim
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap(),
    );
    let other = connect(pooler.addr).await;
    other.simple_query("SELECT 1").await.unwrap();
    pg.primary
        .psql("app", &format!("SELECT pg_terminate_backend({pid})"))
        .unwrap();
    let error = victim.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        error.is_closed() || error.code().is_some(),
        "the victim hears its server is gone: {error}"
    );
    // The server's FATAL reaches the victim, which closes too: either
    // close may reach the pooler first.
    assert!(
        eventually(Duration::from_secs(5), || {
            let snapshot = relay(&pooler);
            snapshot.take_backs("server_closed") + snapshot.take_backs("client_closed") == 1
                && snapshot.sessions == 1
        })
        .await,
        "{:?}",
        relay(&pooler)
    );
    // The other session is untouched; a new client gets a new server.
    assert_eq!(
        simple_rows(&other.simple_query("SELECT 5").await.unwrap()),
        vec![vec!["5".to_owned()]]
    );
    drop(victim);
    let next = connect(pooler.addr).await;
    assert_ne!(
        backend_pid(
            &next
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
        ),
        pid
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_crosses_the_kernel_relay() {
    if !can_run_postgres("listen_notify_crosses_the_kernel_relay") {
        return;
    }
    use futures_util::StreamExt;
    let pg = cluster(false);
    let pooler = start(&pg, 1).await;
    let (client, mut connection) =
        harness::client_config(pooler.addr, "app", harness::APP_PASSWORD)
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    client.batch_execute("LISTEN farol_kr").await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    // Handed over just after the answer went out.
    assert!(
        eventually(Duration::from_secs(5), || relay(&pooler).sessions == 1).await,
        "{:?}",
        relay(&pooler)
    );
    for i in 0..3 {
        pg.primary
            .psql("app", &format!("NOTIFY farol_kr, 'hello {i}'"))
            .unwrap();
        let payload = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(payload, format!("hello {i}"));
    }
    drop(client);
    let _ = driver.await;
    let next = connect(pooler.addr).await;
    let listening = next
        .query_one("SELECT count(*) FROM pg_listening_channels()", &[])
        .await
        .unwrap();
    assert_eq!(
        listening.get::<_, i64>(0),
        0,
        "reset after the relayed session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_session_on_a_former_primary_gets_57p01() {
    if !can_run_postgres("a_relayed_session_on_a_former_primary_gets_57p01") {
        return;
    }
    let pg = cluster(true);
    let standby = SocketAddr::from(([127, 0, 0, 1], pg.standby.as_ref().unwrap().port));
    let pooler = start(&pg, 2).await;
    let stuck = connect(pooler.addr).await;
    stuck.simple_query("SELECT 1").await.unwrap();
    // Handed over just after the answer went out.
    assert!(
        eventually(Duration::from_secs(5), || relay(&pooler).sessions == 1).await,
        "{:?}",
        relay(&pooler)
    );
    let pending = tokio::spawn(async move { stuck.simple_query("SELECT pg_sleep(20)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The pooler follows a new primary (as a role check or pgha would).
    pooler.pooler.set_primary(standby);
    let error = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("an answer within 10 s")
        .unwrap()
        .expect_err("the session on the former primary ends");
    assert_eq!(sqlstate(&error), "57P01", "{error}");
    assert!(
        harness::message(&error).contains("primary moved"),
        "{error}"
    );
    assert_eq!(relay(&pooler).take_backs("primary_moved"), 1);
    assert_eq!(relay(&pooler).sessions, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_odd_terminates_through_the_relay_do_not_break_the_pooler() {
    if !can_run_postgres("garbage_and_odd_terminates_through_the_relay_do_not_break_the_pooler") {
        return;
    }
    let pg = cluster(false);
    let pooler = start(&pg, 1).await;
    // Server connections opened, over the pools of every user.
    let connects = || {
        pooler
            .pooler
            .pools()
            .iter()
            .map(|pool| pool.stats.server_connects.load(Ordering::Relaxed))
            .sum::<u64>()
    };

    // Garbage once relayed: the server refuses it and closes; the client
    // hears the server's FATAL, the pooler takes the pair back.
    let mut raw = RawClient::login(pooler.addr).await;
    raw.query("SELECT 1").await;
    raw.send(b"\xff\x00\x00\x00\x08abcd").await;
    let answer = raw.read_to_end().await;
    assert_eq!(answer.first(), Some(&b'E'), "{answer:?}");
    assert!(
        eventually(Duration::from_secs(5), || relay(&pooler)
            .take_backs("server_closed")
            >= 1)
        .await,
        "{:?}",
        relay(&pooler)
    );

    // A Terminate coalesced behind a query is relayed with it: the server
    // answers and exits; the pooler drops that server (degraded, not wrong).
    let mut raw = RawClient::login(pooler.addr).await;
    raw.query("SELECT 1").await;
    let mut both = query_message("SELECT 2");
    both.extend_from_slice(&farol_common::socket_relay::TERMINATE_MESSAGE);
    raw.send(&both).await;
    let answer = raw.read_to_end().await;
    assert!(
        answer.windows(6).any(|w| w == b"Z\x00\x00\x00\x05I"),
        "SELECT 2 answered: {answer:?}"
    );
    let before = connects();

    // Terminate's bytes alone in the middle of a COPY: the pooler takes
    // them for a Terminate, the strict reset finds the server busy, and
    // closes it rather than reuse it.
    let mut raw = RawClient::login(pooler.addr).await;
    raw.query("CREATE TEMP TABLE t (x text)").await;
    raw.send(&query_message("COPY t FROM STDIN")).await;
    let answer = raw.read_some().await;
    assert_eq!(answer.first(), Some(&b'G'), "CopyInResponse: {answer:?}");
    raw.send(b"d\x00\x00\x00\x09").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    raw.send(&farol_common::socket_relay::TERMINATE_MESSAGE)
        .await;
    drop(raw);

    // Through all of it the pooler keeps serving, on fresh servers.
    assert!(
        eventually(Duration::from_secs(10), || relay(&pooler).sessions == 0).await,
        "{:?}",
        relay(&pooler)
    );
    let next = connect(pooler.addr).await;
    assert_eq!(
        simple_rows(&next.simple_query("SELECT 'fine'").await.unwrap()),
        vec![vec!["fine".to_owned()]]
    );
    assert!(
        connects() > before,
        "the busy server was not reused: {} connects, {before} before; {:?}",
        connects(),
        relay(&pooler)
    );
}

fn query_message(sql: &str) -> Vec<u8> {
    let mut out = vec![b'Q'];
    out.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    out.extend_from_slice(sql.as_bytes());
    out.push(0);
    out
}

/// A client that speaks the protocol by hand (md5 login as `app_md5`).
struct RawClient {
    stream: tokio::net::TcpStream,
}

impl RawClient {
    async fn login(addr: SocketAddr) -> RawClient {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut body = 196608u32.to_be_bytes().to_vec();
        for (k, v) in [("user", "app_md5"), ("database", "app")] {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        stream.write_all(&out).await.unwrap();
        let mut raw = RawClient { stream };
        let (tag, body) = raw.message().await;
        assert_eq!(
            (tag, &body[..4]),
            (b'R', &5u32.to_be_bytes()[..]),
            "md5 asked"
        );
        let salt: [u8; 4] = body[4..8].try_into().unwrap();
        let hash = postgres_protocol::authentication::md5_hash(
            b"app_md5",
            harness::MD5_PASSWORD.as_bytes(),
            salt,
        );
        let mut out = vec![b'p'];
        out.extend_from_slice(&((hash.len() + 5) as u32).to_be_bytes());
        out.extend_from_slice(hash.as_bytes());
        out.push(0);
        raw.send(&out).await;
        while raw.message().await.0 != b'Z' {}
        raw
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Runs a simple query to its ReadyForQuery.
    async fn query(&mut self, sql: &str) {
        self.send(&query_message(sql)).await;
        loop {
            let (tag, body) = self.message().await;
            assert_ne!(tag, b'E', "{sql}: {}", String::from_utf8_lossy(&body));
            if tag == b'Z' {
                return;
            }
        }
    }

    async fn message(&mut self) -> (u8, Vec<u8>) {
        let read = async {
            let tag = self.stream.read_u8().await.unwrap();
            let len = self.stream.read_u32().await.unwrap() as usize;
            let mut body = vec![0u8; len - 4];
            self.stream.read_exact(&mut body).await.unwrap();
            (tag, body)
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("a message within 10 s")
    }

    async fn read_some(&mut self) -> Vec<u8> {
        let mut buf = vec![0u8; 65536];
        let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .unwrap_or(0);
        buf.truncate(n);
        buf
    }

    /// Everything until the other side closes.
    async fn read_to_end(&mut self) -> Vec<u8> {
        let mut all = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.stream.read_to_end(&mut all))
            .await
            .expect("closed within 10 s");
        all
    }
}
