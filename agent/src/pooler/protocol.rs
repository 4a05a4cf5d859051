//! PostgreSQL protocol v3 messages, typed both ways, as far as the pooler
//! needs them (PostgreSQL docs, "Frontend/Backend Protocol", 55.7 Message
//! Formats).
//!
//! Parsing never copies: a [`FrontendMessage`] borrows the bytes it came
//! from, and the server side is only split into whole frames by header
//! ([`frame`]). "Need more bytes" is a value (`Ok(None)`), never an error.
//! Encoders append to a `BytesMut` so a session builds one write per batch.

use bytes::{BufMut, BytesMut};

/// Frames longer than this are refused (PostgreSQL's own limit for most
/// messages is 1 GB; the pooler buffers a frame only when it rewrites it).
pub const MAX_MESSAGE_LEN: usize = 1 << 30;
/// A startup packet longer than this is refused (PostgreSQL allows 10,000).
pub const MAX_STARTUP_LEN: usize = 10_000;

/// Protocol 3.0 in a StartupMessage.
pub const PROTOCOL_3_0: u32 = 196_608;
/// The codes that replace the protocol version in special startup packets.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid message length {len} for message type {tag:?}")]
    Length { tag: char, len: u64 },
    #[error("invalid startup packet length {len}")]
    StartupLength { len: u32 },
    #[error("unsupported frontend protocol {major}.{minor}: the pooler speaks 3.0")]
    Version { major: u16, minor: u16 },
    #[error("malformed {what} message")]
    Malformed { what: &'static str },
}

/// The first packet of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup<'a> {
    SslRequest,
    GssEncRequest,
    Cancel {
        process_id: i32,
        secret_key: i32,
    },
    /// A StartupMessage: `user`, `database`, and other parameters.
    Params(Vec<(&'a str, &'a str)>),
}

/// Parses a startup packet at the start of `buf`: `Ok(None)` when more
/// bytes are needed, else the packet and how many bytes it used.
pub fn parse_startup(buf: &[u8]) -> Result<Option<(Startup<'_>, usize)>, ProtocolError> {
    let Some(len) = read_u32(buf, 0) else {
        return Ok(None);
    };
    if !(8..=MAX_STARTUP_LEN as u32).contains(&len) {
        return Err(ProtocolError::StartupLength { len });
    }
    let len_usize = len as usize;
    if buf.len() < len_usize {
        return Ok(None);
    }
    let body = &buf[4..len_usize];
    let code = read_u32(body, 0).ok_or(ProtocolError::StartupLength { len })?;
    let startup = match code {
        SSL_REQUEST_CODE if len == 8 => Startup::SslRequest,
        GSSENC_REQUEST_CODE if len == 8 => Startup::GssEncRequest,
        CANCEL_REQUEST_CODE if len == 16 => Startup::Cancel {
            process_id: read_u32(body, 4).ok_or(ProtocolError::StartupLength { len })? as i32,
            secret_key: read_u32(body, 8).ok_or(ProtocolError::StartupLength { len })? as i32,
        },
        PROTOCOL_3_0 => {
            let mut params = Vec::new();
            let mut rest = &body[4..];
            loop {
                let (key, after) = cstr(rest).ok_or(ProtocolError::Malformed {
                    what: "StartupMessage",
                })?;
                if key.is_empty() {
                    break;
                }
                let (value, after) = cstr(after).ok_or(ProtocolError::Malformed {
                    what: "StartupMessage",
                })?;
                params.push((key, value));
                rest = after;
            }
            Startup::Params(params)
        }
        other => {
            return Err(ProtocolError::Version {
                major: (other >> 16) as u16,
                minor: (other & 0xffff) as u16,
            })
        }
    };
    Ok(Some((startup, len_usize)))
}

/// The header of a regular message at the start of `buf`: its type byte and
/// its whole length (type byte included). `Ok(None)`: need more bytes.
pub fn frame(buf: &[u8]) -> Result<Option<(u8, usize)>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 || len as usize > MAX_MESSAGE_LEN {
        return Err(ProtocolError::Length {
            tag: tag as char,
            len: u64::from(len),
        });
    }
    Ok(Some((tag, len as usize + 1)))
}

/// A message from a client, borrowing its bytes (the whole frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendMessage<'a> {
    Query {
        sql: &'a str,
    },
    Parse {
        name: &'a str,
        sql: &'a str,
        /// The parameter type count and OIDs, as sent.
        param_types: &'a [u8],
    },
    Bind {
        portal: &'a str,
        statement: &'a str,
        /// Everything after the statement name, as sent.
        rest: &'a [u8],
    },
    Describe {
        kind: u8,
        name: &'a str,
    },
    Close {
        kind: u8,
        name: &'a str,
    },
    Execute,
    Sync,
    Flush,
    Terminate,
    CopyData,
    CopyDone,
    CopyFail,
    FunctionCall,
    /// PasswordMessage, SASLInitialResponse and SASLResponse share 'p'.
    Password {
        body: &'a [u8],
    },
}

impl<'a> FrontendMessage<'a> {
    /// Types a whole frame (as delimited by [`frame`]).
    pub fn parse(frame: &'a [u8]) -> Result<FrontendMessage<'a>, ProtocolError> {
        let Some((&tag, rest)) = frame.split_first() else {
            return Err(ProtocolError::Malformed { what: "empty" });
        };
        let body = rest
            .get(4..)
            .ok_or(ProtocolError::Malformed { what: "short" })?;
        let malformed = |what| ProtocolError::Malformed { what };
        Ok(match tag {
            b'Q' => FrontendMessage::Query {
                sql: cstr(body).ok_or(malformed("Query"))?.0,
            },
            b'P' => {
                let (name, after) = cstr(body).ok_or(malformed("Parse"))?;
                let (sql, after) = cstr(after).ok_or(malformed("Parse"))?;
                let count = read_u16(after, 0).ok_or(malformed("Parse"))? as usize;
                if after.len() != 2 + 4 * count {
                    return Err(malformed("Parse"));
                }
                FrontendMessage::Parse {
                    name,
                    sql,
                    param_types: after,
                }
            }
            b'B' => {
                let (portal, after) = cstr(body).ok_or(malformed("Bind"))?;
                let (statement, after) = cstr(after).ok_or(malformed("Bind"))?;
                FrontendMessage::Bind {
                    portal,
                    statement,
                    rest: after,
                }
            }
            b'D' | b'C' => {
                let (&kind, after) = body.split_first().ok_or(malformed("Describe/Close"))?;
                if kind != b'S' && kind != b'P' {
                    return Err(malformed("Describe/Close"));
                }
                let name = cstr(after).ok_or(malformed("Describe/Close"))?.0;
                if tag == b'D' {
                    FrontendMessage::Describe { kind, name }
                } else {
                    FrontendMessage::Close { kind, name }
                }
            }
            b'E' => FrontendMessage::Execute,
            b'S' => FrontendMessage::Sync,
            b'H' => FrontendMessage::Flush,
            b'X' => FrontendMessage::Terminate,
            b'd' => FrontendMessage::CopyData,
            b'c' => FrontendMessage::CopyDone,
            b'f' => FrontendMessage::CopyFail,
            b'F' => FrontendMessage::FunctionCall,
            b'p' => FrontendMessage::Password { body },
            _ => return Err(malformed("unknown frontend")),
        })
    }
}

/// A NUL-terminated UTF-8 string and what follows it.
fn cstr(buf: &[u8]) -> Option<(&str, &[u8])> {
    let end = buf.iter().position(|&b| b == 0)?;
    let text = std::str::from_utf8(&buf[..end]).ok()?;
    Some((text, &buf[end + 1..]))
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at + 4)?;
    Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    let bytes = buf.get(at..at + 2)?;
    Some(u16::from_be_bytes([bytes[0], bytes[1]]))
}

/// Writes a message: type, length placeholder, body by `body`, then fixes
/// the length.
fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_u32(0);
    body(out);
    let len = (out.len() - at) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(out: &mut BytesMut, text: &str) {
    out.put_slice(text.as_bytes());
    out.put_u8(0);
}

// ---- Backend messages (pooler -> client) -------------------------------

/// ErrorResponse with severity, SQLSTATE and message (fields S, V, C, M).
pub fn error_response(out: &mut BytesMut, severity: &str, code: &str, text: &str) {
    message(out, b'E', |out| {
        out.put_u8(b'S');
        put_cstr(out, severity);
        out.put_u8(b'V');
        put_cstr(out, severity);
        out.put_u8(b'C');
        put_cstr(out, code);
        out.put_u8(b'M');
        put_cstr(out, text);
        out.put_u8(0);
    });
}

pub fn authentication_ok(out: &mut BytesMut) {
    message(out, b'R', |out| out.put_u32(0));
}

pub fn authentication_md5(out: &mut BytesMut, salt: [u8; 4]) {
    message(out, b'R', |out| {
        out.put_u32(5);
        out.put_slice(&salt);
    });
}

/// AuthenticationSASL with the mechanisms offered, most preferred first.
pub fn authentication_sasl(out: &mut BytesMut, mechanisms: &[&str]) {
    message(out, b'R', |out| {
        out.put_u32(10);
        for mechanism in mechanisms {
            put_cstr(out, mechanism);
        }
        out.put_u8(0);
    });
}

pub fn authentication_sasl_continue(out: &mut BytesMut, data: &[u8]) {
    message(out, b'R', |out| {
        out.put_u32(11);
        out.put_slice(data);
    });
}

pub fn authentication_sasl_final(out: &mut BytesMut, data: &[u8]) {
    message(out, b'R', |out| {
        out.put_u32(12);
        out.put_slice(data);
    });
}

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    message(out, b'S', |out| {
        put_cstr(out, name);
        put_cstr(out, value);
    });
}

pub fn backend_key_data(out: &mut BytesMut, process_id: i32, secret_key: i32) {
    message(out, b'K', |out| {
        out.put_i32(process_id);
        out.put_i32(secret_key);
    });
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    message(out, b'Z', |out| out.put_u8(status));
}

pub fn parse_complete(out: &mut BytesMut) {
    message(out, b'1', |_| {});
}

pub fn close_complete(out: &mut BytesMut) {
    message(out, b'3', |_| {});
}

pub fn command_complete(out: &mut BytesMut, tag: &str) {
    message(out, b'C', |out| put_cstr(out, tag));
}

pub fn empty_query_response(out: &mut BytesMut) {
    message(out, b'I', |_| {});
}

/// RowDescription of text columns (the admin console's results).
pub fn row_description(out: &mut BytesMut, columns: &[&str]) {
    message(out, b'T', |out| {
        out.put_u16(columns.len() as u16);
        for column in columns {
            put_cstr(out, column);
            out.put_u32(0); // table OID
            out.put_u16(0); // column number
            out.put_u32(25); // text
            out.put_i16(-1);
            out.put_i32(-1);
            out.put_u16(0); // text format
        }
    });
}

pub fn data_row(out: &mut BytesMut, values: &[String]) {
    message(out, b'D', |out| {
        out.put_u16(values.len() as u16);
        for value in values {
            out.put_u32(value.len() as u32);
            out.put_slice(value.as_bytes());
        }
    });
}

// ---- Frontend messages (pooler -> server) ------------------------------

pub fn startup_message(out: &mut BytesMut, params: &[(&str, &str)]) {
    let at = out.len();
    out.put_u32(0);
    out.put_u32(PROTOCOL_3_0);
    for (key, value) in params {
        put_cstr(out, key);
        put_cstr(out, value);
    }
    out.put_u8(0);
    let len = (out.len() - at) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn cancel_request(out: &mut BytesMut, process_id: i32, secret_key: i32) {
    out.put_u32(16);
    out.put_u32(CANCEL_REQUEST_CODE);
    out.put_i32(process_id);
    out.put_i32(secret_key);
}

pub fn query(out: &mut BytesMut, sql: &str) {
    message(out, b'Q', |out| put_cstr(out, sql));
}

pub fn parse(out: &mut BytesMut, name: &str, sql: &str, param_types: &[u8]) {
    message(out, b'P', |out| {
        put_cstr(out, name);
        put_cstr(out, sql);
        out.put_slice(param_types);
    });
}

pub fn bind(out: &mut BytesMut, portal: &str, statement: &str, rest: &[u8]) {
    message(out, b'B', |out| {
        put_cstr(out, portal);
        put_cstr(out, statement);
        out.put_slice(rest);
    });
}

pub fn describe(out: &mut BytesMut, kind: u8, name: &str) {
    message(out, b'D', |out| {
        out.put_u8(kind);
        put_cstr(out, name);
    });
}

pub fn terminate(out: &mut BytesMut) {
    message(out, b'X', |_| {});
}

pub fn password(out: &mut BytesMut, data: &[u8]) {
    message(out, b'p', |out| out.put_slice(data));
}

pub fn sasl_initial_response(out: &mut BytesMut, mechanism: &str, data: &[u8]) {
    message(out, b'p', |out| {
        put_cstr(out, mechanism);
        out.put_i32(data.len() as i32);
        out.put_slice(data);
    });
}

/// The fields of an ErrorResponse or NoticeResponse body, by field code.
pub fn error_fields(body: &[u8]) -> Vec<(u8, &str)> {
    let mut fields = Vec::new();
    let mut rest = body;
    while let Some((&code, after)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let Some((value, after)) = cstr(after) else {
            break;
        };
        fields.push((code, value));
        rest = after;
    }
    fields
}

/// SASLInitialResponse body: mechanism and its data.
pub fn parse_sasl_initial(body: &[u8]) -> Option<(&str, &[u8])> {
    let (mechanism, after) = cstr(body)?;
    let len = read_u32(after, 0)? as i32;
    let data = after.get(4..)?;
    if len < 0 || len as usize != data.len() {
        return None;
    }
    Some((mechanism, data))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn parse_round_trips_through_the_encoder() {
        let mut out = BytesMut::new();
        parse(&mut out, "s1", "SELECT $1", &[0, 1, 0, 0, 0, 23]);
        let (tag, len) = frame(&out).unwrap().unwrap();
        assert_eq!((tag, len), (b'P', out.len()));
        assert_eq!(
            FrontendMessage::parse(&out).unwrap(),
            FrontendMessage::Parse {
                name: "s1",
                sql: "SELECT $1",
                param_types: &[0, 1, 0, 0, 0, 23],
            }
        );
    }

    #[test]
    fn startup_parses_parameters_and_special_codes() {
        let mut out = BytesMut::new();
        startup_message(&mut out, &[("user", "app"), ("database", "db")]);
        let (startup, used) = parse_startup(&out).unwrap().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(
            startup,
            Startup::Params(vec![("user", "app"), ("database", "db")])
        );
        for cut in 0..out.len() {
            assert_eq!(parse_startup(&out[..cut]).unwrap(), None);
        }
        let mut cancel = BytesMut::new();
        cancel_request(&mut cancel, 7, -9);
        assert_eq!(
            parse_startup(&cancel).unwrap().unwrap().0,
            Startup::Cancel {
                process_id: 7,
                secret_key: -9
            }
        );
    }

    #[test]
    fn huge_and_tiny_lengths_are_errors_not_waits() {
        assert!(frame(&[b'Q', 0, 0, 0, 3]).is_err());
        assert!(frame(&[b'Q', 0x7f, 0xff, 0xff, 0xff]).is_err());
        assert!(parse_startup(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(parse_startup(&[0, 0, 0, 4]).is_err());
    }

    proptest! {
        /// Arbitrary bytes never panic: a frame is found, more is needed,
        /// or an error names the problem; typed parsing of any frame too.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_startup(&bytes);
            if let Ok(Some((_, len))) = frame(&bytes) {
                if len <= bytes.len() {
                    let _ = FrontendMessage::parse(&bytes[..len]);
                }
            }
        }

        /// Every truncation of a valid frame asks for more bytes.
        #[test]
        fn truncated_frames_need_more(sql in "[ -~]{0,64}", name in "[a-z0-9]{0,8}", cut in 0usize..100) {
            let mut out = BytesMut::new();
            parse(&mut out, &name, &sql, &[0, 0]);
            let cut = cut.min(out.len() - 1);
            match frame(&out[..cut]) {
                Ok(None) => {}
                Ok(Some((_, len))) => prop_assert!(len > cut),
                Err(error) => prop_assert!(false, "{error}"),
            }
            let (_, len) = frame(&out).unwrap().unwrap();
            prop_assert!(FrontendMessage::parse(&out[..len]).is_ok());
        }

        /// Typed parsing of a frame with a random type and body never panics.
        #[test]
        fn unknown_types_and_bodies_never_panic(tag in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut out = BytesMut::new();
            message(&mut out, tag, |out| out.put_slice(&body));
            let _ = FrontendMessage::parse(&out);
        }
    }
}
