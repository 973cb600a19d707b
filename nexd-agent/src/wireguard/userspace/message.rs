//! WireGuard's four message types (the first byte of every datagram) and
//! what a message received and the answer it produced mean for the
//! handshake. boringtun parses and checks the messages; this names them
//! where the data path decides on them.

use boringtun::noise::Packet;

/// The type of a WireGuard message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    HandshakeInitiation = 1,
    HandshakeResponse = 2,
    CookieReply = 3,
    /// Transport data; empty inside, a keepalive.
    Data = 4,
}

impl MessageType {
    /// The type of a datagram boringtun produced (its first byte; the
    /// three reserved bytes after it are zero in anything it formats).
    pub fn of(datagram: &[u8]) -> Option<Self> {
        match datagram.first()? {
            1 => Some(MessageType::HandshakeInitiation),
            2 => Some(MessageType::HandshakeResponse),
            3 => Some(MessageType::CookieReply),
            4 => Some(MessageType::Data),
            _ => None,
        }
    }

    /// The type of a message boringtun parsed (type and length checked).
    pub fn of_packet(packet: &Packet<'_>) -> Self {
        match packet {
            Packet::HandshakeInit(_) => MessageType::HandshakeInitiation,
            Packet::HandshakeResponse(_) => MessageType::HandshakeResponse,
            Packet::PacketCookieReply(_) => MessageType::CookieReply,
            Packet::PacketData(_) => MessageType::Data,
        }
    }
}

/// Whether receiving a message of type `received` that produced one of
/// type `sent` completed a handshake: an initiation answered with a
/// response (we are the responder), or a response answered with the first
/// keepalive (we are the initiator). A cookie reply completes nothing.
pub fn completes_handshake(received: MessageType, sent: MessageType) -> bool {
    use MessageType::{Data, HandshakeInitiation, HandshakeResponse};
    matches!(
        (received, sent),
        (HandshakeInitiation, HandshakeResponse) | (HandshakeResponse, Data)
    )
}

#[cfg(test)]
mod tests {
    use boringtun::noise::Tunn;

    use super::*;
    use MessageType::*;

    #[test]
    fn handshakes_complete_on_response_and_first_keepalive_only() {
        assert!(completes_handshake(HandshakeInitiation, HandshakeResponse));
        assert!(completes_handshake(HandshakeResponse, Data));
        assert!(
            !completes_handshake(HandshakeInitiation, CookieReply),
            "a cookie reply"
        );
        assert!(!completes_handshake(Data, Data));
    }

    #[test]
    fn the_first_byte_names_the_type_as_the_parser_does() {
        for (t, len) in [
            (HandshakeInitiation, 148),
            (HandshakeResponse, 92),
            (CookieReply, 64),
            (Data, 32),
        ] {
            let mut d = vec![0u8; len];
            d[0] = t as u8;
            assert_eq!(MessageType::of(&d), Some(t));
            let parsed = Tunn::parse_incoming_packet(&d).expect("a message");
            assert_eq!(MessageType::of_packet(&parsed), t);
        }
        assert_eq!(MessageType::of(&[5, 0, 0, 0]), None);
        assert_eq!(MessageType::of(&[]), None);
    }
}
