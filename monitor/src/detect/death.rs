//! `silent_death`: a connection the kernel killed without an RST or FIN ever arriving:
//! the network dropped it silently (a NAT or firewall forgot the flow, a peer vanished), and
//! retransmission, keepalive or TCP_USER_TIMEOUT gave up. The next write fails at once with
//! `connection timed out`. The kernel half (`state.rs`) reads `sk_err` as the socket closes.
use super::Kind;
use crate::{events::Event, sockets::died_silently};

/// The predicate lives with the sockets: the pools count deaths per minute too.
pub fn classify(event: &Event) -> Option<Kind> {
    died_silently(event).then_some(Kind::SilentDeath)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{from_raw, tests::raw_reset};
    use monitor_common::{hook, tcp_state};

    fn death(old: u8, sk_err: i32) -> Event {
        let mut raw = raw_reset(30_000);
        raw.hook = hook::STATE_CHANGE;
        raw.old_state = old;
        raw.new_state = tcp_state::CLOSE;
        raw.sk_err = sk_err;
        from_raw(&raw).unwrap()
    }

    #[test]
    fn silent_deaths_only() {
        let kind = Some(Kind::SilentDeath);
        assert_eq!(
            classify(&death(tcp_state::ESTABLISHED, libc::ETIMEDOUT)),
            kind
        );
        assert_eq!(
            classify(&death(tcp_state::CLOSE_WAIT, libc::EHOSTUNREACH)),
            kind
        );
        assert_eq!(
            classify(&death(tcp_state::ESTABLISHED, 0)),
            None,
            "normal close"
        );
        assert_eq!(
            classify(&death(tcp_state::ESTABLISHED, libc::ECONNRESET)),
            None,
            "an RST"
        );
        assert_eq!(
            classify(&death(tcp_state::ESTABLISHED, libc::ECONNABORTED)),
            None,
            "ss -K"
        );
        assert_eq!(
            classify(&death(tcp_state::SYN_SENT, libc::ETIMEDOUT)),
            None,
            "connect timeout"
        );
    }
}
