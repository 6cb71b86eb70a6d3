//! The application runs into a connection its peer ended: `write: broken pipe`,
//! `ECONNRESET`, `EOFError`. The kernel half (`monitor-ebpf/src/used_after.rs`) reports only the
//! first send/recv on such a socket, so each finding here is the moment the app found out.
use super::Kind;
use crate::events::{Event, PeerEnd};

pub fn classify(event: &Event) -> Option<Kind> {
    Some(match event.io?.peer_end {
        PeerEnd::Reset => Kind::UsedAfterReset,
        PeerEnd::Fin => Kind::UsedAfterClose,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{from_raw, tests::raw_reset, tests::raw_send_after_reset};

    #[test]
    fn peer_end_decides_the_kind() {
        let mut raw = raw_send_after_reset();
        assert_eq!(
            classify(&from_raw(&raw).unwrap()),
            Some(Kind::UsedAfterReset)
        );
        raw.peer_end = monitor_common::peer_end::FIN;
        assert_eq!(
            classify(&from_raw(&raw).unwrap()),
            Some(Kind::UsedAfterClose)
        );
        assert_eq!(classify(&from_raw(&raw_reset(1)).unwrap()), None);
    }
}
