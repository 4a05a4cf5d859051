//! Authentication on both sides of the pooler.
//!
//! Clients: md5 (RFC-less PostgreSQL scheme, docs 21.5 "Password
//! Authentication") and SCRAM-SHA-256 (RFC 5802 / RFC 7677; over TLS also
//! SCRAM-SHA-256-PLUS with `tls-server-end-point` channel binding, RFC
//! 5929, as PostgreSQL offers it) against the configured secrets, which are stored exactly as
//! PostgreSQL stores them in `pg_authid.rolpassword`, so no plain password
//! sits in the config. The server side of SCRAM is written here with
//! `hmac`/`sha2`/`base64`: `postgres-protocol` only implements the client.
//!
//! Servers: the pooler logs in with `server_password` through
//! `postgres-protocol`'s md5 and SCRAM client. Users found by `auth_query`
//! have no password in the config: the pooler logs in with what their
//! client's login gave it, as PgBouncer does: the md5 secret answers md5
//! challenges as the password would, and the SCRAM ClientKey recovered
//! from the client's proof (with the verifier's ServerKey) runs a SCRAM
//! exchange without the password.

use base64::{engine::general_purpose::STANDARD as BASE64, Engine};
use bytes::BytesMut;
use hmac::{Hmac, Mac};
use md5::{Digest as _, Md5};
use sha2::Sha256;

use super::protocol;

/// SCRAM iterations of secrets the pooler makes (PostgreSQL's default).
pub const SCRAM_ITERATIONS: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("secret: expected \"md5\" followed by 32 hex digits or a SCRAM-SHA-256 verifier \"SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>\"")]
    SecretFormat,
    #[error("password authentication failed for user \"{user}\"")]
    Failed { user: String },
    #[error("malformed authentication message from the client: {what}")]
    Malformed { what: &'static str },
    #[error("the client chose SASL mechanism {mechanism:?}, which was not offered (SCRAM-SHA-256, and SCRAM-SHA-256-PLUS over TLS)")]
    Mechanism { mechanism: String },
    #[error("the server asked for a password and none is configured for user \"{user}\" (pooler.users[].server_password)")]
    NoServerPassword { user: String },
    #[error("the server asked for an unsupported authentication method {code}")]
    Unsupported { code: u32 },
    #[error("SCRAM exchange with the server failed")]
    ServerScram(#[source] std::io::Error),
    #[error("the server asked user \"{user}\" for {asked}, and the secret from auth_query only answers {have}")]
    CredentialMismatch {
        user: String,
        asked: &'static str,
        have: &'static str,
    },
}

/// How the pooler logs in to a server as one user.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum ServerCredential {
    /// No password: the server trusts the pooler.
    #[default]
    None,
    /// `server_password` from the config.
    Password(String),
    /// The md5 secret (32 hex digits) from `auth_query`.
    Md5(String),
    /// SCRAM keys of a user found by `auth_query`: ClientKey from a
    /// client's proof, ServerKey from the verifier.
    ScramKeys {
        client_key: [u8; 32],
        server_key: [u8; 32],
    },
}

impl std::fmt::Debug for ServerCredential {
    // Never prints the secret itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServerCredential::None => "None",
            ServerCredential::Password(_) => "Password(..)",
            ServerCredential::Md5(_) => "Md5(..)",
            ServerCredential::ScramKeys { .. } => "ScramKeys(..)",
        })
    }
}

/// A user's secret as PostgreSQL stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Secret {
    /// The 32 hex digits after `md5`: md5(password + user).
    Md5(String),
    Scram {
        iterations: u32,
        salt: Vec<u8>,
        stored_key: [u8; 32],
        server_key: [u8; 32],
    },
}

impl Secret {
    pub fn parse(text: &str) -> Result<Secret, AuthError> {
        if let Some(hex) = text.strip_prefix("md5") {
            if hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(Secret::Md5(hex.to_ascii_lowercase()));
            }
            return Err(AuthError::SecretFormat);
        }
        let rest = text
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(AuthError::SecretFormat)?;
        let (params, keys) = rest.split_once('$').ok_or(AuthError::SecretFormat)?;
        let (iterations, salt) = params.split_once(':').ok_or(AuthError::SecretFormat)?;
        let (stored, server) = keys.split_once(':').ok_or(AuthError::SecretFormat)?;
        let key = |b64: &str| -> Result<[u8; 32], AuthError> {
            BASE64
                .decode(b64)
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or(AuthError::SecretFormat)
        };
        Ok(Secret::Scram {
            iterations: iterations.parse().map_err(|_| AuthError::SecretFormat)?,
            salt: BASE64.decode(salt).map_err(|_| AuthError::SecretFormat)?,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }
}

/// A SCRAM-SHA-256 verifier for `password`, as `CREATE ROLE ... PASSWORD`
/// would store it (for configs and tests).
pub fn scram_secret(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

/// An md5 secret for `user` and `password`.
pub fn md5_secret(user: &str, password: &str) -> String {
    postgres_protocol::password::md5(password.as_bytes(), user)
}

fn md5_hex(parts: &[&[u8]]) -> String {
    let mut hasher = Md5::new();
    for part in parts {
        hasher.update(part);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks an md5 PasswordMessage body (`md5<hex>\0`) against the secret.
pub fn md5_check(
    user: &str,
    stored_hex: &str,
    salt: [u8; 4],
    body: &[u8],
) -> Result<(), AuthError> {
    let expected = format!("md5{}", md5_hex(&[stored_hex.as_bytes(), &salt]));
    let sent = body.strip_suffix(&[0]).unwrap_or(body);
    if constant_time_eq(sent, expected.as_bytes()) {
        Ok(())
    } else {
        Err(AuthError::Failed {
            user: user.to_owned(),
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The server side of one SCRAM-SHA-256 exchange (RFC 5802 section 3).
#[derive(Debug)]
pub struct ScramServer {
    user: String,
    stored_key: [u8; 32],
    server_key: [u8; 32],
    /// `client-first-message-bare,server-first-message`, kept for the
    /// AuthMessage.
    first_messages: String,
    /// What the client must echo base64-encoded in `c=`: the GS2 header
    /// it sent, followed by the channel binding data when it asked for it.
    channel_binding_input: Vec<u8>,
    nonce: String,
}

/// SASL mechanism names (PostgreSQL's).
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The only channel binding type PostgreSQL (and the pooler) support.
const TLS_SERVER_END_POINT: &str = "tls-server-end-point";

impl ScramServer {
    /// Takes the client-first-message of a plain SCRAM-SHA-256 exchange
    /// (no channel binding offered) and returns the server-first-message.
    pub fn start(
        user: &str,
        secret: &Secret,
        client_first: &[u8],
    ) -> Result<(ScramServer, String), AuthError> {
        ScramServer::start_with_binding(user, secret, SCRAM_SHA_256, client_first, None)
    }

    /// As [`ScramServer::start`] for the `mechanism` the client chose.
    /// `end_point` is the `tls-server-end-point` data of this connection's
    /// certificate when the pooler offered SCRAM-SHA-256-PLUS (TLS);
    /// `None` when it did not.
    pub fn start_with_binding(
        user: &str,
        secret: &Secret,
        mechanism: &str,
        client_first: &[u8],
        end_point: Option<&[u8]>,
    ) -> Result<(ScramServer, String), AuthError> {
        let Secret::Scram {
            iterations,
            salt,
            stored_key,
            server_key,
        } = secret
        else {
            return Err(AuthError::Failed {
                user: user.to_owned(),
            });
        };
        let malformed = |what| AuthError::Malformed { what };
        let text = std::str::from_utf8(client_first)
            .map_err(|_| malformed("client-first-message is not UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let mut parts = text.splitn(3, ',');
        let flag = parts.next().unwrap_or_default();
        let authzid = parts.next().ok_or(malformed("client-first-message"))?;
        let bare = parts.next().ok_or(malformed("client-first-message"))?;
        let binding_data = channel_binding(user, mechanism, flag, end_point)?;
        let client_nonce = bare
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .filter(|nonce| !nonce.is_empty())
            .ok_or(malformed("client-first-message has no nonce"))?;
        let server_nonce: [u8; 18] = rand::random();
        let nonce = format!("{client_nonce}{}", BASE64.encode(server_nonce));
        let server_first = format!("r={nonce},s={},i={iterations}", BASE64.encode(salt));
        Ok((
            ScramServer {
                user: user.to_owned(),
                stored_key: *stored_key,
                server_key: *server_key,
                first_messages: format!("{bare},{server_first}"),
                channel_binding_input: [format!("{flag},{authzid},").as_bytes(), binding_data]
                    .concat(),
                nonce,
            },
            server_first,
        ))
    }

    /// Checks the client-final-message; returns the server-final-message.
    pub fn finish(self, client_final: &[u8]) -> Result<String, AuthError> {
        self.finish_with_client_key(client_final)
            .map(|(last, _)| last)
    }

    /// As [`ScramServer::finish`], also returning the ClientKey recovered
    /// from the proof (what lets the pooler log in as this user).
    pub fn finish_with_client_key(
        self,
        client_final: &[u8],
    ) -> Result<(String, [u8; 32]), AuthError> {
        let malformed = |what| AuthError::Malformed { what };
        let text = std::str::from_utf8(client_final)
            .map_err(|_| malformed("client-final-message is not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(malformed("client-final-message has no proof"))?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(value) = attr.strip_prefix("c=") {
                channel = Some(value);
            } else if let Some(value) = attr.strip_prefix("r=") {
                nonce = Some(value);
            }
        }
        let failed = || AuthError::Failed {
            user: self.user.clone(),
        };
        if channel != Some(BASE64.encode(&self.channel_binding_input).as_str())
            || nonce != Some(self.nonce.as_str())
        {
            return Err(failed());
        }
        let proof: [u8; 32] = BASE64
            .decode(proof)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(malformed("client proof"))?;
        let auth_message = format!("{},{without_proof}", self.first_messages);
        let signature = hmac(&self.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for (i, byte) in client_key.iter_mut().enumerate() {
            *byte = proof[i] ^ signature[i];
        }
        let computed: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&computed, &self.stored_key) {
            return Err(failed());
        }
        let server_signature = hmac(&self.server_key, auth_message.as_bytes());
        Ok((format!("v={}", BASE64.encode(server_signature)), client_key))
    }
}

/// Checks the client's GS2 channel-binding flag against the mechanism it
/// chose and what was offered (RFC 5802 section 6, PostgreSQL's rules);
/// returns the binding data its `c=` must carry after the GS2 header.
fn channel_binding<'a>(
    user: &str,
    mechanism: &str,
    flag: &str,
    end_point: Option<&'a [u8]>,
) -> Result<&'a [u8], AuthError> {
    let malformed = |what| AuthError::Malformed { what };
    match (mechanism, flag, end_point) {
        (SCRAM_SHA_256_PLUS, _, None) => Err(malformed(
            "SCRAM-SHA-256-PLUS is only offered over TLS with a certificate whose hash is known",
        )),
        (SCRAM_SHA_256_PLUS, flag, Some(data)) => match flag.strip_prefix("p=") {
            Some(TLS_SERVER_END_POINT) => Ok(data),
            Some(_) => Err(malformed(
                "unsupported channel binding type (only tls-server-end-point)",
            )),
            None => Err(malformed(
                "SCRAM-SHA-256-PLUS needs a p=tls-server-end-point GS2 header",
            )),
        },
        (SCRAM_SHA_256, "n", _) | (SCRAM_SHA_256, "y", None) => Ok(&[]),
        // The client can bind but believes the server cannot, while it
        // was offered SCRAM-SHA-256-PLUS: the offer was tampered with.
        (SCRAM_SHA_256, "y", Some(_)) => Err(AuthError::Failed {
            user: user.to_owned(),
        }),
        (SCRAM_SHA_256, _, _) => Err(malformed(
            "channel binding asked for with SCRAM-SHA-256 (it needs SCRAM-SHA-256-PLUS)",
        )),
        _ => Err(AuthError::Mechanism {
            mechanism: mechanism.to_owned(),
        }),
    }
}

/// The pooler's side of a server's authentication request; `None` when
/// nothing is to be sent (AuthenticationOk, SASLFinal).
#[derive(Default)]
pub struct ServerLogin {
    scram: Option<postgres_protocol::authentication::sasl::ScramSha256>,
    keyed: Option<KeyedScram>,
}

/// The client side of SCRAM-SHA-256 with the keys instead of the password
/// (`postgres-protocol`'s client only takes a password).
struct KeyedScram {
    client_key: [u8; 32],
    server_key: [u8; 32],
    client_nonce: String,
    /// Set after the server-first-message.
    auth_message: Option<String>,
}

impl KeyedScram {
    fn new(client_key: [u8; 32], server_key: [u8; 32]) -> KeyedScram {
        let nonce: [u8; 18] = rand::random();
        KeyedScram {
            client_key,
            server_key,
            client_nonce: BASE64.encode(nonce),
            auth_message: None,
        }
    }

    /// client-first-message; PostgreSQL takes the user from the startup
    /// packet, so the SCRAM user name is empty.
    fn first(&self) -> String {
        format!("n,,n=,r={}", self.client_nonce)
    }

    /// Takes the server-first-message, returns the client-final-message.
    fn update(&mut self, server_first: &[u8]) -> std::io::Result<String> {
        let invalid =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        let text = std::str::from_utf8(server_first)
            .map_err(|_| invalid("server-first-message is not UTF-8"))?;
        let nonce = text
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .ok_or_else(|| invalid("server-first-message has no nonce"))?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() {
            return Err(invalid("the server's nonce does not extend ours"));
        }
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("n=,r={},{text},{without_proof}", self.client_nonce);
        let stored_key: [u8; 32] = Sha256::digest(self.client_key).into();
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let mut proof = [0u8; 32];
        for (i, byte) in proof.iter_mut().enumerate() {
            *byte = self.client_key[i] ^ signature[i];
        }
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)))
    }

    /// Checks the server-final-message's signature.
    fn finish(&self, server_final: &[u8]) -> std::io::Result<()> {
        let invalid =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        let auth_message = self
            .auth_message
            .as_ref()
            .ok_or_else(|| invalid("SASLFinal before SASLContinue"))?;
        let text = std::str::from_utf8(server_final)
            .map_err(|_| invalid("server-final-message is not UTF-8"))?;
        let sent = text
            .strip_prefix("v=")
            .and_then(|b64| BASE64.decode(b64.trim_end_matches(['\0', ' '])).ok())
            .ok_or_else(|| invalid("server-final-message has no signature"))?;
        let expected = hmac(&self.server_key, auth_message.as_bytes());
        if constant_time_eq(&sent, &expected) {
            Ok(())
        } else {
            Err(invalid(
                "the server's signature does not match: not the server that holds this verifier",
            ))
        }
    }
}

impl std::fmt::Debug for ServerLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerLogin").finish_non_exhaustive()
    }
}

impl ServerLogin {
    /// Answers one AuthenticationRequest body (after the type and length).
    pub fn answer(
        &mut self,
        user: &str,
        credential: &ServerCredential,
        body: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), AuthError> {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let code = body
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(AuthError::Unsupported { code: u32::MAX })?;
        let mismatch = |asked: &'static str| AuthError::CredentialMismatch {
            user: user.to_owned(),
            asked,
            have: match credential {
                ServerCredential::Md5(_) => "md5",
                _ => "SCRAM-SHA-256",
            },
        };
        let password = || match credential {
            ServerCredential::Password(password) => Ok(password.as_str()),
            ServerCredential::None => Err(AuthError::NoServerPassword {
                user: user.to_owned(),
            }),
            ServerCredential::Md5(_) | ServerCredential::ScramKeys { .. } => {
                Err(mismatch(match code {
                    3 => "a clear-text password",
                    5 => "md5",
                    _ => "SCRAM-SHA-256",
                }))
            }
        };
        match code {
            0 => {}
            3 => {
                let mut data = password()?.as_bytes().to_vec();
                data.push(0);
                protocol::password(out, &data);
            }
            5 => {
                let salt: [u8; 4] = body
                    .get(4..8)
                    .and_then(|s| s.try_into().ok())
                    .ok_or(AuthError::Unsupported { code })?;
                let mut data = match credential {
                    // The md5 secret is all the md5 answer needs.
                    ServerCredential::Md5(hex) => {
                        format!("md5{}", md5_hex(&[hex.as_bytes(), &salt])).into_bytes()
                    }
                    _ => postgres_protocol::authentication::md5_hash(
                        user.as_bytes(),
                        password()?.as_bytes(),
                        salt,
                    )
                    .into_bytes(),
                };
                data.push(0);
                protocol::password(out, &data);
            }
            10 => {
                if let ServerCredential::ScramKeys {
                    client_key,
                    server_key,
                } = credential
                {
                    let keyed = KeyedScram::new(*client_key, *server_key);
                    protocol::sasl_initial_response(out, "SCRAM-SHA-256", keyed.first().as_bytes());
                    self.keyed = Some(keyed);
                } else {
                    let scram =
                        ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    protocol::sasl_initial_response(out, "SCRAM-SHA-256", scram.message());
                    self.scram = Some(scram);
                }
            }
            11 => {
                if let Some(keyed) = self.keyed.as_mut() {
                    let last = keyed.update(&body[4..]).map_err(AuthError::ServerScram)?;
                    protocol::password(out, last.as_bytes());
                } else {
                    let scram = self.scram.as_mut().ok_or(AuthError::Unsupported { code })?;
                    scram.update(&body[4..]).map_err(AuthError::ServerScram)?;
                    protocol::password(out, scram.message());
                }
            }
            12 => {
                if let Some(keyed) = self.keyed.take() {
                    keyed.finish(&body[4..]).map_err(AuthError::ServerScram)?;
                } else {
                    let mut scram = self.scram.take().ok_or(AuthError::Unsupported { code })?;
                    scram.finish(&body[4..]).map_err(AuthError::ServerScram)?;
                }
            }
            code => return Err(AuthError::Unsupported { code }),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_made_by_postgres_protocol_parse() {
        assert!(matches!(
            Secret::parse(&scram_secret("pw")),
            Ok(Secret::Scram {
                iterations: 4096,
                ..
            })
        ));
        assert!(matches!(
            Secret::parse(&md5_secret("u", "pw")),
            Ok(Secret::Md5(_))
        ));
        assert!(Secret::parse("plain").is_err());
        assert!(Secret::parse("md5xyz").is_err());
        assert!(Secret::parse("SCRAM-SHA-256$4096:c2FsdA==$AAAA:BBBB").is_err());
    }

    #[test]
    fn scram_exchange_with_postgres_protocol_client_succeeds_and_wrong_password_fails() {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let secret = Secret::parse(&scram_secret("right")).unwrap();
        for (password, ok) in [("right", true), ("wrong", false)] {
            let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
            let (server, first) = ScramServer::start("u", &secret, client.message()).unwrap();
            client.update(first.as_bytes()).unwrap();
            let result = server.finish(client.message());
            assert_eq!(result.is_ok(), ok, "{result:?}");
            if let Ok(last) = result {
                client.finish(last.as_bytes()).unwrap();
            }
        }
    }

    /// Runs one exchange: the client binds with `client_binding` and picks
    /// `mechanism`; the server offered PLUS with `server_end_point`.
    fn bound_exchange(
        client_binding: postgres_protocol::authentication::sasl::ChannelBinding,
        mechanism: &str,
        server_end_point: Option<&[u8]>,
    ) -> Result<(), AuthError> {
        use postgres_protocol::authentication::sasl::ScramSha256;
        let secret = Secret::parse(&scram_secret("right")).unwrap();
        let mut client = ScramSha256::new(b"right", client_binding);
        let (server, first) = ScramServer::start_with_binding(
            "u",
            &secret,
            mechanism,
            client.message(),
            server_end_point,
        )?;
        client.update(first.as_bytes()).unwrap();
        let last = server.finish(client.message())?;
        client.finish(last.as_bytes()).unwrap();
        Ok(())
    }

    #[test]
    fn channel_binding_needs_the_same_certificate_hash_on_both_sides() {
        use postgres_protocol::authentication::sasl::ChannelBinding;
        let hash = [7u8; 32];
        let bound = || ChannelBinding::tls_server_end_point(hash.to_vec());
        assert!(bound_exchange(bound(), SCRAM_SHA_256_PLUS, Some(&hash)).is_ok());
        // A man in the middle terminates TLS with another certificate.
        let other = [8u8; 32];
        assert!(matches!(
            bound_exchange(bound(), SCRAM_SHA_256_PLUS, Some(&other)),
            Err(AuthError::Failed { .. })
        ));
        // PLUS was not offered (no TLS): refused, not silently unbound.
        assert!(matches!(
            bound_exchange(bound(), SCRAM_SHA_256_PLUS, None),
            Err(AuthError::Malformed { .. })
        ));
        // Binding data with the plain mechanism is a protocol error.
        assert!(matches!(
            bound_exchange(bound(), SCRAM_SHA_256, Some(&hash)),
            Err(AuthError::Malformed { .. })
        ));
    }

    #[test]
    fn a_client_that_could_bind_but_saw_no_plus_offer_is_refused_only_when_plus_was_offered() {
        use postgres_protocol::authentication::sasl::ChannelBinding;
        // "y": the client supports binding and thinks the server does not.
        assert!(bound_exchange(ChannelBinding::unrequested(), SCRAM_SHA_256, None).is_ok());
        assert!(matches!(
            bound_exchange(
                ChannelBinding::unrequested(),
                SCRAM_SHA_256,
                Some(&[7u8; 32])
            ),
            Err(AuthError::Failed { .. })
        ));
        // "n" (no binding support) is fine either way.
        let plain = ChannelBinding::unsupported;
        assert!(bound_exchange(plain(), SCRAM_SHA_256, Some(&[7u8; 32])).is_ok());
        assert!(matches!(
            bound_exchange(plain(), "SCRAM-SHA-1", None),
            Err(AuthError::Mechanism { .. })
        ));
    }

    #[test]
    fn md5_check_accepts_the_libpq_answer() {
        let secret = md5_secret("u", "pw");
        let Secret::Md5(hex) = Secret::parse(&secret).unwrap() else {
            panic!("md5 secret");
        };
        let salt = [1, 2, 3, 4];
        let answer = postgres_protocol::authentication::md5_hash(b"u", b"pw", salt);
        assert!(md5_check("u", &hex, salt, answer.as_bytes()).is_ok());
        let wrong = postgres_protocol::authentication::md5_hash(b"u", b"no", salt);
        assert!(md5_check("u", &hex, salt, wrong.as_bytes()).is_err());
    }

    #[test]
    fn keys_recovered_from_a_client_proof_log_in_without_the_password() {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let secret = Secret::parse(&scram_secret("right")).unwrap();
        let Secret::Scram { server_key, .. } = secret else {
            panic!("scram secret");
        };
        // A client logs in to the pooler: its proof yields the ClientKey.
        let mut client = ScramSha256::new(b"right", ChannelBinding::unsupported());
        let (server, first) = ScramServer::start("u", &secret, client.message()).unwrap();
        client.update(first.as_bytes()).unwrap();
        let (_, client_key) = server.finish_with_client_key(client.message()).unwrap();
        // The pooler logs in to a server holding the same verifier.
        for (key, ok) in [(client_key, true), ([7u8; 32], false)] {
            let credential = ServerCredential::ScramKeys {
                client_key: key,
                server_key,
            };
            let mut login = ServerLogin::default();
            let mut out = BytesMut::new();
            login
                .answer("u", &credential, &10u32.to_be_bytes(), &mut out)
                .unwrap();
            let (_, initial) = protocol::parse_sasl_initial(&out[5..]).unwrap();
            let (server, first) = ScramServer::start("u", &secret, initial).unwrap();
            let mut body = 11u32.to_be_bytes().to_vec();
            body.extend_from_slice(first.as_bytes());
            out.clear();
            login.answer("u", &credential, &body, &mut out).unwrap();
            let result = server.finish(&out[5..]);
            assert_eq!(result.is_ok(), ok, "{result:?}");
            if let Ok(last) = result {
                let mut body = 12u32.to_be_bytes().to_vec();
                body.extend_from_slice(last.as_bytes());
                login.answer("u", &credential, &body, &mut out).unwrap();
            }
        }
    }

    #[test]
    fn an_md5_secret_answers_an_md5_challenge_as_the_password_would() {
        let Secret::Md5(hex) = Secret::parse(&md5_secret("u", "pw")).unwrap() else {
            panic!("md5 secret");
        };
        let mut body = 5u32.to_be_bytes().to_vec();
        body.extend_from_slice(&[9, 8, 7, 6]);
        let answer = |credential: &ServerCredential| {
            let mut out = BytesMut::new();
            ServerLogin::default()
                .answer("u", credential, &body, &mut out)
                .map(|()| out)
        };
        assert_eq!(
            answer(&ServerCredential::Md5(hex.clone())).unwrap(),
            answer(&ServerCredential::Password("pw".into())).unwrap()
        );
        // An md5 secret cannot answer SCRAM.
        let mut out = BytesMut::new();
        assert!(matches!(
            ServerLogin::default().answer(
                "u",
                &ServerCredential::Md5(hex),
                &10u32.to_be_bytes(),
                &mut out
            ),
            Err(AuthError::CredentialMismatch { .. })
        ));
    }
}
