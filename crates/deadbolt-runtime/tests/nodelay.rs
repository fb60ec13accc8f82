//! Every TCP connection of a service has TCP_NODELAY: the connections its
//! gRPC servers accept and its Postgres connections. Without it a request's
//! or response's last small write waits for the peer's delayed ACK (40-100
//! ms on Linux): sqlx 0.9.0 dropped the option on database sockets, and
//! tonic ignores its own setting for listeners it is given, which cost
//! about 90 ms at most stage hand-offs. The sockets are found in this
//! process's open files (Linux) and asked directly.

#![cfg(target_os = "linux")]

use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use deadbolt_runtime::server::{self, Guard};
use deadbolt_store::repos::Health;
use deadbolt_test_support::pg::Pg;

/// (local address, peer address, TCP_NODELAY) of each connected TCP socket
/// of this process.
fn tcp_sockets() -> Vec<(SocketAddr, SocketAddr, bool)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // SAFETY: the fd is open (listed just now) and only borrowed for
        // these calls; a socket closed meanwhile only makes them fail
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let (Ok(local), Ok(peer), Ok(nodelay)) =
            (sock.local_addr(), sock.peer_addr(), sock.tcp_nodelay())
        else {
            continue;
        };
        if let (Some(local), Some(peer)) = (local.as_socket(), peer.as_socket()) {
            found.push((local, peer, nodelay));
        }
    }
    found
}

#[tokio::test]
async fn accepted_grpc_connections_have_nodelay() {
    let listener = server::bind("127.0.0.1:0").await.unwrap();
    let (addr, task) = server::spawn_with(
        "test",
        tonic::service::Routes::default(),
        listener,
        None,
        Guard::Open,
        None,
    )
    .await
    .unwrap();
    let client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let client_addr = client.local_addr().unwrap();
    let mut accepted = None;
    for _ in 0..200 {
        accepted = tcp_sockets()
            .into_iter()
            .find(|(local, peer, _)| *local == addr && *peer == client_addr);
        if accepted.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, _, nodelay) = accepted.expect("the server accepted the connection");
    assert!(nodelay, "an accepted gRPC connection without TCP_NODELAY");
    task.abort();
}

#[tokio::test]
async fn postgres_connections_have_nodelay() {
    let pg = Pg::fresh().await;
    // postgres://user@host:port/db
    let port: u16 = pg
        .url()
        .rsplit_once('@')
        .and_then(|(_, rest)| rest.split('/').next()?.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(5432);
    let store = deadbolt_store::PgStore::connect(pg.url()).await.unwrap();
    store.ping().await.unwrap();
    let to_pg: Vec<bool> = tcp_sockets()
        .into_iter()
        .filter(|(_, peer, _)| peer.port() == port)
        .map(|(_, _, nodelay)| nodelay)
        .collect();
    assert!(!to_pg.is_empty(), "no connection to port {port} found");
    assert!(
        to_pg.iter().all(|n| *n),
        "database connections without TCP_NODELAY: {to_pg:?}"
    );
    drop(store);
    pg.drop_db().await;
}
