//! The agent-to-agent volume protocol: typed messages, framed with a 4-byte
//! length (tokio-util's `LengthDelimitedCodec`), authenticated with an
//! HMAC-SHA256 tag (see `auth.rs`), bodies encoded with postcard.
//!
//! A frame is `length (u32 BE) | tag (32) | postcard(Message)`. The tag
//! covers the session salt, the frame's sequence number in its direction
//! (not sent: both ends count), and the body, so a frame cannot be
//! replayed, reordered, or spliced into another connection. The first
//! frame a client sends is `Hello` with a random nonce; the server answers
//! `HelloAck` with its own; from then on the salt is both nonces. Then the
//! client sends `Request`s and the server answers each with a `Response` of
//! the same id, in order, except a file sync (`Apply` of `Op::Fsync`),
//! answered when its disk is done while later changes go on. Requests on
//! one connection are applied in the order sent, which is what keeps
//! replicas of a file identical.

use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use super::{
    auth::{FrameKey, TAG_LEN},
    brick::{Entry, ManifestEntry, Op},
};

/// The largest frame accepted: a 4 MiB write or heal chunk plus headers.
pub const MAX_FRAME: usize = 5 * 1024 * 1024;
/// The largest data chunk in one heal or write frame.
pub const MAX_CHUNK: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// First frame from a client: who it is and which volume it speaks for.
    Hello {
        node: String,
        volume: String,
        nonce: [u8; 16],
    },
    /// The server's answer: its name and how many changes it holds that
    /// the client's replica missed (non-zero: the client is not current).
    HelloAck {
        node: String,
        pending_for_you: u64,
        nonce: [u8; 16],
    },
    Request {
        id: u64,
        body: Request,
    },
    Response {
        id: u64,
        body: Response,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Liveness; answered with `Ok`.
    Ping,
    /// Apply a change to the brick. `missed` names replicas the sender
    /// knows are down, so the receiver records the change for them too.
    Apply { op: Op, missed: Vec<String> },
    /// Self-heal: make `path` on the receiver's brick equal `entry`.
    Heal { path: String, entry: Entry },
    /// Whether the receiver's `path` has this [`Brick::digest`]: a second
    /// healer of the same returning replica skips what the first one
    /// already installed. Answered `Ok` (same) or `Differs`.
    ///
    /// [`Brick::digest`]: super::brick::Brick::digest
    HealProbe { path: String, digest: [u8; 32] },
    /// Make every heal entry installed so far durable (one syncfs of the
    /// brick for a batch of entries); answered after them.
    HealSync,
    /// The sender still holds `remaining` changes the receiver missed.
    HealProgress { remaining: u64 },
    /// Every entry of the brick with a digest (full-scan heal).
    Manifest,
    /// Record `path` as missed by `peer` (full-scan heal picked this
    /// receiver's copy as the source).
    MarkPending { path: String, peer: String },
    /// What this node's replica knows (`agent volume heal-info`).
    Status,
    /// Start a full-scan heal (`agent volume heal --full`).
    FullHeal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Ok,
    /// The change failed on the receiver with this errno.
    Errno(i32),
    /// Heal refused: the receiver changed the same path while apart and
    /// its copy wins under the split-brain policy.
    Rejected,
    /// A `HealProbe`'s path differs here.
    Differs,
    Manifest(Vec<ManifestEntry>),
    Status(StatusReport),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub node: String,
    pub volume: String,
    /// The local brick is known to be current (serves reads).
    pub current: bool,
    pub peers: Vec<PeerStatus>,
    /// Named counters (also on /metrics).
    pub counters: Vec<(String, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node: String,
    pub up: bool,
    /// Changes this node holds that `node` missed.
    pub pending: u64,
    /// A few of those paths, for the operator.
    pub sample: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame longer than {MAX_FRAME} bytes")]
    TooLong,
    #[error("frame shorter than its authentication tag ({len} bytes)")]
    Short { len: usize },
    #[error("bad authentication tag (wrong cluster secret or corrupted frame)")]
    BadTag,
    #[error("undecodable message: {0}")]
    Malformed(#[source] postcard::Error),
    #[error("cannot encode a message: {0}")]
    Encode(#[source] postcard::Error),
}

impl FrameError {
    /// A label for the `reason` of the bad-frame counter.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::Io(_) => "io",
            FrameError::TooLong => "too_long",
            FrameError::Short { .. } => "short",
            FrameError::BadTag => "bad_tag",
            FrameError::Malformed(_) => "malformed",
            FrameError::Encode(_) => "encode",
        }
    }

    /// Whether the peer sent something invalid (rather than going away).
    pub fn is_garbage(&self) -> bool {
        !matches!(self, FrameError::Io(_) | FrameError::Encode(_))
    }
}

/// Length-delimited, HMAC-tagged, postcard-encoded [`Message`]s.
#[derive(Debug)]
pub struct FrameCodec {
    key: FrameKey,
    frames: LengthDelimitedCodec,
    salt: Vec<u8>,
    sent: u64,
    received: u64,
}

impl FrameCodec {
    pub fn new(key: FrameKey) -> FrameCodec {
        FrameCodec {
            key,
            frames: LengthDelimitedCodec::builder()
                .max_frame_length(MAX_FRAME)
                .new_codec(),
            salt: Vec::new(),
            sent: 0,
            received: 0,
        }
    }

    /// After the handshake: every later frame is bound to both nonces.
    pub fn set_session(&mut self, client: &[u8; 16], server: &[u8; 16]) {
        self.salt = [&client[..], &server[..]].concat();
    }

    /// The tag of a frame: the session salt, the frame's sequence number
    /// and the body, hashed in place (a 1 MiB write is not copied for it).
    fn tag(&self, sequence: u64, body: &[u8]) -> [u8; TAG_LEN] {
        self.key
            .sign_parts(&[&self.salt, &sequence.to_be_bytes(), body])
    }

    fn tag_matches(&self, sequence: u64, body: &[u8], tag: &[u8]) -> bool {
        self.key
            .verify_parts(&[&self.salt, &sequence.to_be_bytes(), body], tag)
    }
}

/// A random nonce for the handshake.
pub fn nonce() -> std::io::Result<[u8; 16]> {
    use std::io::Read;
    let mut nonce = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut nonce)?;
    Ok(nonce)
}

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, FrameError> {
        let frame = match self.frames.decode(src) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(None),
            // LengthDelimitedCodec reports an oversized length as
            // InvalidData; anything else is the connection.
            Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                return Err(FrameError::TooLong)
            }
            Err(error) => return Err(FrameError::Io(error)),
        };
        if frame.len() < TAG_LEN {
            return Err(FrameError::Short { len: frame.len() });
        }
        let (tag, body) = frame.split_at(TAG_LEN);
        if !self.tag_matches(self.received, body, tag) {
            return Err(FrameError::BadTag);
        }
        self.received += 1;
        postcard::from_bytes(body)
            .map(Some)
            .map_err(FrameError::Malformed)
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, message: Message, dst: &mut BytesMut) -> Result<(), FrameError> {
        let body = postcard::to_allocvec(&message).map_err(FrameError::Encode)?;
        if body.len() + TAG_LEN > MAX_FRAME {
            return Err(FrameError::TooLong);
        }
        // The length prefix LengthDelimitedCodec reads (4 bytes, big
        // endian, of tag and body), written straight into `dst`: the body
        // is copied once.
        let tag = self.tag(self.sent, &body);
        dst.reserve(4 + TAG_LEN + body.len());
        dst.put_u32((TAG_LEN + body.len()) as u32);
        dst.put_slice(&tag);
        dst.put_slice(&body);
        self.sent += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn codec() -> FrameCodec {
        FrameCodec::new(FrameKey::new(b"test secret 0123456789").unwrap())
    }

    fn encoded(message: Message) -> BytesMut {
        let mut buf = BytesMut::new();
        codec().encode(message, &mut buf).unwrap();
        buf
    }

    fn sample() -> Message {
        Message::Request {
            id: 7,
            body: Request::Apply {
                op: Op::Write {
                    path: "a/b".into(),
                    offset: 3,
                    data: vec![1, 2, 3],
                    mtime_ns: 5,
                },
                missed: vec!["c".into()],
            },
        }
    }

    #[test]
    fn a_message_round_trips() {
        let mut buf = encoded(sample());
        assert_eq!(codec().decode(&mut buf).unwrap(), Some(sample()));
        assert!(buf.is_empty());
    }

    #[test]
    fn a_frame_signed_with_another_secret_is_refused() {
        let mut other = FrameCodec::new(FrameKey::new(b"another secret 0123456").unwrap());
        let mut buf = BytesMut::new();
        other.encode(sample(), &mut buf).unwrap();
        assert!(matches!(codec().decode(&mut buf), Err(FrameError::BadTag)));
    }

    #[test]
    fn a_replayed_frame_is_refused() {
        let mut sender = codec();
        let mut buf = BytesMut::new();
        sender.encode(sample(), &mut buf).unwrap();
        let replay = buf.clone();
        let mut receiver = codec();
        assert_eq!(receiver.decode(&mut buf).unwrap(), Some(sample()));
        let mut buf = replay;
        assert!(matches!(receiver.decode(&mut buf), Err(FrameError::BadTag)));
    }

    #[test]
    fn a_frame_from_another_session_is_refused() {
        let mut sender = codec();
        sender.set_session(&[1; 16], &[2; 16]);
        let mut buf = BytesMut::new();
        sender.encode(sample(), &mut buf).unwrap();
        let mut receiver = codec();
        receiver.set_session(&[1; 16], &[3; 16]);
        assert!(matches!(receiver.decode(&mut buf), Err(FrameError::BadTag)));
    }

    #[test]
    fn a_huge_length_is_refused_before_buffering() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3][..]);
        assert!(matches!(codec().decode(&mut buf), Err(FrameError::TooLong)));
    }

    proptest! {
        #[test]
        fn every_truncation_needs_more_bytes(cut in 0usize..64) {
            let full = encoded(sample());
            let cut = cut.min(full.len() - 1);
            let mut buf = BytesMut::from(&full[..cut]);
            prop_assert!(matches!(codec().decode(&mut buf), Ok(None)));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut codec = codec();
            for _ in 0..8 {
                match codec.decode(&mut buf) {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }

        #[test]
        fn a_flipped_bit_is_refused(index in 4usize..60, bit in 0u8..8) {
            let mut buf = encoded(sample());
            let index = index.min(buf.len() - 1);
            buf[index] ^= 1 << bit;
            prop_assert!(!matches!(codec().decode(&mut buf), Ok(Some(_))));
        }

        #[test]
        fn a_validly_signed_garbage_body_is_an_error_not_a_panic(
            body in proptest::collection::vec(any::<u8>(), 0..256)
        ) {
            let key = FrameKey::new(b"test secret 0123456789").unwrap();
            let mut frame = BytesMut::new();
            frame.put_u32((body.len() + TAG_LEN) as u32);
            let mut input = 0u64.to_be_bytes().to_vec();
            input.extend_from_slice(&body);
            frame.put_slice(&key.sign(&input));
            frame.put_slice(&body);
            let _ = codec().decode(&mut frame);
        }
    }
}
