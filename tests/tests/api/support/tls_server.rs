//! A PostgreSQL server that accepts only TLS, shared by the TLS tests of a run: started once
//! (an [`OwnServer`] with `ssl = on` and an `hba_file` of `hostssl` lines only), with a server
//! certificate for `localhost` signed by a CA made here with the `openssl` command, and a second
//! CA that signed nothing. A watchdog stops it when the test process exits.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::support::process::OwnServer;

pub struct TlsServer {
    pub server: OwnServer,
    /// The CA that signed the server's certificate.
    pub ca: PathBuf,
    /// A CA that signed nothing the server has.
    pub other_ca: PathBuf,
}

impl TlsServer {
    /// A URL of the server by the name its certificate is for (`localhost`).
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@localhost:{}/postgres",
            self.server.port
        )
    }

    /// A URL of the same server by an address the certificate does not name (`127.0.0.1`).
    pub fn url_by_address(&self) -> String {
        self.server.url("postgres")
    }
}

/// The shared server, started by the first test that asks.
pub fn tls_server() -> &'static TlsServer {
    static SERVER: OnceLock<TlsServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let mut ca = PathBuf::new();
        let mut other_ca = PathBuf::new();
        let server = OwnServer::start_with(|dir| {
            make_ca(dir, "ca");
            make_ca(dir, "other-ca");
            make_server_certificate(dir);
            let hba = dir.join("pg_hba.conf");
            // Unix socket for pg_ctl; over TCP, TLS or nothing.
            std::fs::write(
                &hba,
                "local all all trust\n\
                 hostssl all all 127.0.0.1/32 trust\n\
                 hostssl all all ::1/128 trust\n",
            )
            .expect("pg_hba.conf is written");
            ca = dir.join("ca.crt");
            other_ca = dir.join("other-ca.crt");
            let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
            format!(
                "-c ssl=on -c ssl_cert_file={} -c ssl_key_file={} -c hba_file={}",
                path("server.crt"),
                path("server.key"),
                path("pg_hba.conf"),
            )
        });
        server.stop_when_this_process_exits();
        TlsServer {
            server,
            ca,
            other_ca,
        }
    })
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed (scripts/test installs it)");
    assert!(
        output.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `<name>.key` and a self-signed CA certificate `<name>.crt`, valid for a day.
fn make_ca(dir: &Path, name: &str) {
    let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
    let subject = format!("/CN=inventory-api test {name}");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            &key,
            "-out",
            &crt,
            "-subj",
            &subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// `server.key` (mode 0600, as PostgreSQL requires) and `server.crt` for `localhost` only,
/// signed by `ca`.
fn make_server_certificate(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .expect("server.ext is written");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            "server.crt",
            "-extfile",
            "server.ext",
        ],
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("server.key is made private");
}
