//! EC2 instance metadata (IMDSv2): instance type and region, for the status.
//!
//! Only informative: nothing in the decision depends on it, and off EC2 it
//! must cost at most the configured bound. The whole query (token, then two
//! reads) shares one deadline; the first failure ends it.

use crate::settings::Imds;
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct ImdsFacts {
    pub instance_type: Option<String>,
    pub region: Option<String>,
    pub error: Option<String>,
    pub elapsed_ms: u64,
    pub skipped: bool,
}

pub fn query(s: &Imds) -> ImdsFacts {
    if !s.enabled {
        return ImdsFacts {
            skipped: true,
            ..Default::default()
        };
    }
    let started = Instant::now();
    let mut f = ImdsFacts::default();
    if let Err(e) = query_into(s, started, &mut f) {
        f.error = Some(e);
    }
    f.elapsed_ms = started.elapsed().as_millis() as u64;
    f
}

fn query_into(s: &Imds, started: Instant, f: &mut ImdsFacts) -> Result<(), String> {
    let total = Duration::from_millis(s.timeout_ms);
    let remaining = || {
        total
            .checked_sub(started.elapsed())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("no answer within imds.timeout_ms = {}", s.timeout_ms))
    };
    let client = reqwest::blocking::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_millis(s.connect_timeout_ms).min(total))
        .timeout(total)
        .build()
        .map_err(|e| format!("cannot build HTTP client: {e}"))?;
    let base = s.endpoint.trim_end_matches('/');
    let token = client
        .put(format!("{base}/latest/api/token"))
        .header("X-aws-ec2-metadata-token-ttl-seconds", "60")
        .timeout(remaining()?)
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.text())
        .map_err(|e| format!("{base}: token: {}", describe(&e)))?;
    let get = |path: &str| -> Result<String, String> {
        client
            .get(format!("{base}/latest/meta-data/{path}"))
            .header("X-aws-ec2-metadata-token", token.trim())
            .timeout(remaining()?)
            .send()
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.text())
            .map(|t| t.trim().to_string())
            .map_err(|e| format!("{base}: {path}: {}", describe(&e)))
    };
    f.instance_type = Some(get("instance-type")?);
    f.region = Some(get("placement/region")?);
    Ok(())
}

fn describe(e: &reqwest::Error) -> String {
    if let Some(status) = e.status() {
        format!("HTTP {status}")
    } else if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "cannot connect (not on EC2, or IMDS disabled for this instance)".into()
    } else {
        e.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    enum Behaviour {
        Good,
        Hang,
        Error500,
    }

    /// A fake IMDS on 127.0.0.1 that serves `n` connections then stops.
    fn server(b: Behaviour, n: usize) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", l.local_addr().unwrap());
        let conns = Arc::new(AtomicUsize::new(0));
        let token_seen = Arc::new(AtomicUsize::new(0));
        let (c2, t2) = (conns.clone(), token_seen.clone());
        std::thread::spawn(move || {
            for stream in l.incoming().take(n) {
                let Ok(mut s) = stream else { break };
                c2.fetch_add(1, Ordering::SeqCst);
                s.set_read_timeout(Some(Duration::from_secs(3))).ok();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                        break;
                    }
                    let lower = h.to_ascii_lowercase();
                    if lower.starts_with("x-aws-ec2-metadata-token: tok") {
                        t2.fetch_add(1, Ordering::SeqCst);
                    }
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                let _ = r.read_exact(&mut body);
                let reply = |s: &mut std::net::TcpStream, code: &str, body: &str| {
                    let _ = write!(
                        s,
                        "HTTP/1.1 {code}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                };
                match b {
                    Behaviour::Hang => std::thread::sleep(Duration::from_secs(3)),
                    Behaviour::Error500 => reply(&mut s, "500 Internal Server Error", "boom"),
                    Behaviour::Good => {
                        let body = if line.starts_with("PUT /latest/api/token") {
                            "tok123"
                        } else if line.contains("/instance-type") {
                            "m6id.4xlarge"
                        } else if line.contains("/placement/region") {
                            "eu-west-1"
                        } else {
                            ""
                        };
                        reply(&mut s, "200 OK", body);
                    }
                }
            }
        });
        (addr, conns, token_seen)
    }

    fn settings(endpoint: &str) -> Imds {
        Imds {
            enabled: true,
            endpoint: endpoint.into(),
            connect_timeout_ms: 100,
            timeout_ms: 300,
        }
    }

    #[test]
    fn reads_type_and_region_with_the_token() {
        let (addr, conns, token_seen) = server(Behaviour::Good, 3);
        let f = query(&settings(&addr));
        assert_eq!(f.error, None);
        assert_eq!(f.instance_type.as_deref(), Some("m6id.4xlarge"));
        assert_eq!(f.region.as_deref(), Some("eu-west-1"));
        assert_eq!(conns.load(Ordering::SeqCst), 3);
        assert_eq!(
            token_seen.load(Ordering::SeqCst),
            2,
            "metadata reads must carry the token"
        );
    }

    #[test]
    fn a_hung_server_costs_at_most_the_bound() {
        let (addr, _, _) = server(Behaviour::Hang, 1);
        let t = Instant::now();
        let f = query(&settings(&addr));
        assert!(f.error.as_deref().unwrap().contains("timed out"), "{f:?}");
        assert!(f.instance_type.is_none());
        assert!(
            t.elapsed() < Duration::from_millis(300 + 300),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn http_500_is_reported() {
        let (addr, _, _) = server(Behaviour::Error500, 1);
        let f = query(&settings(&addr));
        assert!(f.error.as_deref().unwrap().contains("500"), "{f:?}");
    }

    #[test]
    fn nothing_listening_fails_fast() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = Instant::now();
        let f = query(&settings(&format!("http://127.0.0.1:{port}")));
        assert!(
            f.error.as_deref().unwrap().contains("cannot connect"),
            "{f:?}"
        );
        assert!(t.elapsed() < Duration::from_millis(300));
    }

    #[test]
    fn disabled_makes_no_connection() {
        let (addr, conns, _) = server(Behaviour::Good, 1);
        let mut s = settings(&addr);
        s.enabled = false;
        let f = query(&s);
        assert!(f.skipped && f.error.is_none());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(conns.load(Ordering::SeqCst), 0);
    }
}
