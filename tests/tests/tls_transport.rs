//! TLS migration channels at the transport level: a real handshake over loopback TCP with
//! credentials generated at run time, both directions at once, and every refusal the
//! issue lists (wrong CA, wrong host name, expired certificate, client not allowed).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

use migration::transport::tls::{Authz, Endpoint, TlsCreds};
use migration::transport::Channel;
use tests::certs::{write_dir, TestCa};
use tests::TempDir;

struct Setup {
    server: TlsCreds,
    client: TlsCreds,
}

fn creds(
    dir: &TempDir,
    server_ca: &TestCa,
    client_ca: &TestCa,
    server_cert: (String, String),
    client_cert: Option<(String, String)>,
) -> Setup {
    let s = write_dir(&dir.join("server"), server_ca, "server", Some(server_cert));
    let c = write_dir(&dir.join("client"), client_ca, "client", client_cert);
    Setup {
        server: TlsCreds::load("tls-s", &s, Endpoint::Server, true).expect("server creds"),
        client: TlsCreds::load("tls-c", &c, Endpoint::Client, false).expect("client creds"),
    }
}

/// Runs a handshake; returns (client result, server result) as strings on error.
fn handshake(
    setup: Setup,
    hostname: &str,
    authz: Option<Authz>,
) -> (Result<Channel, String>, Result<Channel, String>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("local address");
    let Setup { server, client } = setup;
    let srv = thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        Channel::Tcp(s)
            .into_tls_server(&server, authz.as_ref())
            .map_err(|e| e.to_string())
    });
    let c = Channel::Tcp(TcpStream::connect(addr).expect("connect"))
        .into_tls_client(&client, hostname)
        .map_err(|e| e.to_string());
    (c, srv.join().expect("server thread"))
}

#[test]
fn tls_carries_data_both_ways_at_once() {
    let dir = TempDir::new("tls-ok");
    let ca = TestCa::new("Ferry CA");
    let setup = creds(
        &dir,
        &ca,
        &ca,
        ca.issue("localhost", &["localhost", "127.0.0.1"], false),
        Some(ca.issue("source.example", &[], false)),
    );
    let allow = Authz::simple("authz0", "CN=source.example,O=Ferry Tests");
    let (c, s) = handshake(setup, "localhost", Some(allow));
    let mut c = c.expect("client handshake");
    let mut s = s.expect("server handshake");
    let data: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i * 31 + (i >> 9)) as u8)
        .collect();
    let expected = data.clone();
    // The server reads everything and, concurrently, its clone writes a reply stream.
    let mut s_reply = s.try_clone().unwrap();
    let replier = thread::spawn(move || {
        for i in 0..1000u32 {
            s_reply.write_all(&i.to_le_bytes()).unwrap();
        }
        s_reply.flush().unwrap();
    });
    let mut c_reader = c.try_clone().unwrap();
    let reader = thread::spawn(move || {
        let mut b = [0u8; 4];
        for i in 0..1000u32 {
            c_reader.read_exact(&mut b).unwrap();
            assert_eq!(u32::from_le_bytes(b), i);
        }
    });
    let sender = thread::spawn(move || {
        c.write_all(&data).unwrap();
        c.flush().unwrap();
        c
    });
    let mut got = vec![0u8; expected.len()];
    s.read_exact(&mut got).unwrap();
    assert!(got == expected, "data corrupted through TLS");
    replier.join().unwrap();
    reader.join().unwrap();
    sender.join().unwrap();
}

#[test]
fn a_wrong_ca_fails_the_handshake() {
    let dir = TempDir::new("tls-ca");
    let ca = TestCa::new("Ferry CA");
    let other = TestCa::new("Another CA");
    let setup = creds(
        &dir,
        &ca,
        &other,
        ca.issue("localhost", &["localhost"], false),
        Some(other.issue("source.example", &[], false)),
    );
    let (c, s) = handshake(setup, "localhost", None);
    let e = c.err().expect("client must fail");
    assert!(e.contains("issuer is unknown"), "{e}");
    assert!(s.is_err());
}

#[test]
fn a_wrong_hostname_fails_with_qemus_message() {
    let dir = TempDir::new("tls-host");
    let ca = TestCa::new("Ferry CA");
    let setup = creds(
        &dir,
        &ca,
        &ca,
        ca.issue("elsewhere", &["elsewhere.example"], false),
        Some(ca.issue("source.example", &[], false)),
    );
    let (c, _) = handshake(setup, "localhost", None);
    assert_eq!(
        c.err().expect("client must fail"),
        "Certificate does not match the hostname localhost"
    );
}

#[test]
fn an_expired_certificate_fails_the_handshake() {
    let dir = TempDir::new("tls-exp");
    let ca = TestCa::new("Ferry CA");
    let setup = creds(
        &dir,
        &ca,
        &ca,
        ca.issue("localhost", &["localhost"], true),
        Some(ca.issue("source.example", &[], false)),
    );
    let (c, _) = handshake(setup, "localhost", None);
    let e = c.err().expect("client must fail");
    assert!(e.contains("expired"), "{e}");
}

#[test]
fn a_client_not_in_the_authz_list_is_denied() {
    let dir = TempDir::new("tls-authz");
    let ca = TestCa::new("Ferry CA");
    let setup = creds(
        &dir,
        &ca,
        &ca,
        ca.issue("localhost", &["localhost"], false),
        Some(ca.issue("intruder.example", &[], false)),
    );
    let allow = Authz::simple("authz0", "CN=source.example,O=Ferry Tests");
    let (_, s) = handshake(setup, "localhost", Some(allow));
    let e = s.err().expect("server must refuse");
    assert!(e.starts_with("TLS x509 authz check for "), "{e}");
    assert!(
        e.contains("CN=intruder.example") && e.ends_with("is denied"),
        "{e}"
    );
}

#[test]
fn an_anonymous_client_is_refused_when_the_server_verifies_peers() {
    let dir = TempDir::new("tls-anon");
    let ca = TestCa::new("Ferry CA");
    let setup = creds(
        &dir,
        &ca,
        &ca,
        ca.issue("localhost", &["localhost"], false),
        None,
    );
    let (_, s) = handshake(setup, "localhost", None);
    let e = s.err().expect("server must refuse");
    assert!(e.contains("no certificate"), "{e}");
}
