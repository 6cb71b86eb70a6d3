//! A throwaway PostgreSQL server (the Debian package) on loopback, in a temp dir.
use std::{
    fs,
    net::TcpStream,
    os::unix::fs::chown,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

pub struct Postgres {
    child: Child,
    /// Removed on drop, after the server has stopped (fields drop after `drop` runs).
    dir: super::TempDir,
    pub port: u16,
}

/// The newest installed server's bin directory, e.g. /usr/lib/postgresql/15/bin.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (cargo xtask test installs it)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL server binary")
}

/// Runs a command as the `postgres` user (the server refuses to run as root); setpriv
/// execs, so the child's pid is the program's.
fn as_postgres(program: &Path) -> Command {
    let mut command = Command::new("setpriv");
    command
        .args([
            "--reuid=postgres",
            "--regid=postgres",
            "--clear-groups",
            "--",
        ])
        .arg(program);
    command
}

impl Postgres {
    pub fn start() -> Postgres {
        static INSTANCES: AtomicUsize = AtomicUsize::new(0);
        let user = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("the postgres user (created by the Debian package)");
        let instance = INSTANCES.fetch_add(1, Ordering::SeqCst);
        let dir = super::TempDir::new(&format!("pg-{instance}"));
        chown(dir.path(), Some(user.uid.as_raw()), Some(user.gid.as_raw())).unwrap();
        let bin = bin_dir();
        let data = dir.join("data");
        let initdb = as_postgres(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            initdb.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        let port = super::listen("127.0.0.1:0").1;
        let log = fs::File::create(dir.join("postgres.log")).unwrap();
        let child = as_postgres(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-p"])
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let postgres = Postgres { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while postgres.connect().is_err() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not start: {}",
                fs::read_to_string(postgres.dir.join("postgres.log")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(100));
        }
        postgres
    }

    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// A client connection (the `postgres` crate: the Rust client stack).
    pub fn connect(&self) -> Result<postgres::Client, postgres::Error> {
        // Wait for the port first: a refused connect is cheaper than a client error.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        postgres::Client::connect(&self.url(), postgres::NoTls)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT: fast shutdown, clients are disconnected.
        let _ = nix::sys::signal::kill(
            super::pid(self.child.id()),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
    }
}
