//! The client side of the relay's HTTP/1.1 exchanges: one POST at a time on a
//! kept-alive connection, written and read by the delivery's own task.
//!
//! A delivery is one request of a known length and one answer, of which the
//! relay needs the status, `Retry-After` and (from a bot) the body. So the
//! request is written in one piece, and the answer's head is read in place
//! with `httparse`, without a header map, a second task or channels between
//! them. What HTTP/1.1 allows of an answer is read: `1xx` interim answers,
//! `Content-Length`, chunked bodies with trailers, bodies that end with the
//! connection, `Connection: close`.

use super::backoff::parse_retry_after;
use super::http::{Answer, AnswerBudget, Failure, MAX_ANSWER_BYTES, Room, SMALL_ANSWER_BYTES};
use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, timeout_at};

/// Largest answer head (status line and headers) read.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Most headers an answer may have.
const MAX_HEADERS: usize = 100;

/// What each read asks for at least.
const READ_SIZE: usize = 8 * 1024;

/// A connection to a target, and what was read of it ahead of use.
pub struct Connection<S> {
    io: S,
    read: BytesMut,
    /// Its socket, to look at without the runtime (see [`Self::idle_state`]).
    socket: Option<RawFd>,
}

/// What a kept-alive connection did while it was idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleState {
    /// Nothing: it can carry another request.
    Idle,
    /// The target closed it (or it failed).
    Closed,
    /// The target sent something, with no request to answer.
    Spoke,
}

/// An answer as the sender needs it.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub retry_after: Option<Duration>,
    pub answer: Answer,
    /// Read to its end, and the target keeps the connection open.
    pub reusable: bool,
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum Error {
    /// Not a byte of an answer came back: the request was not written, or
    /// the connection was closed (as a target does with a connection that was
    /// idle too long) before anything was answered. On a kept-alive
    /// connection, the request is sent again on a new one.
    Unanswered(String),
    /// Anything else: a timeout, a broken answer, a connection lost midway.
    Failed(Failure),
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Self {
        Error::Failed(f)
    }
}

/// How an answer's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// No length: the body is all that comes until the connection closes.
    UntilClose,
}

#[derive(Debug)]
struct Head {
    status: StatusCode,
    retry_after: Option<Duration>,
    framing: Framing,
    /// The target keeps the connection for another request.
    keep_alive: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(io: S) -> Self {
        Self {
            io,
            read: BytesMut::new(),
            socket: None,
        }
    }

    /// A connection whose TCP socket is `socket` (under TLS too).
    pub fn with_socket(io: S, socket: RawFd) -> Self {
        Self {
            socket: Some(socket),
            ..Self::new(io)
        }
    }

    /// Whether the connection can carry another request: nothing has come
    /// from the target since its last answer, and it has not closed it. A
    /// target may send on an idle connection (a `408` before it closes it,
    /// or a stray answer): read as the answer to the next request, that
    /// would shift every answer after it by one, and a message the target
    /// refused would count as delivered.
    ///
    /// The readiness the runtime keeps is looked at first, at no cost. It
    /// lags the socket until the runtime next polls for events (up to a
    /// couple of milliseconds under load), so with `peek` the socket is also
    /// asked directly, at the cost of a system call.
    pub fn idle_state(&mut self, peek: bool) -> IdleState {
        let mut cx = Context::from_waker(Waker::noop());
        let mut scratch = [0u8; 64];
        let mut buf = ReadBuf::new(&mut scratch);
        match Pin::new(&mut self.io).poll_read(&mut cx, &mut buf) {
            Poll::Pending => {}
            Poll::Ready(Ok(())) if !buf.filled().is_empty() => return IdleState::Spoke,
            Poll::Ready(_) => return IdleState::Closed,
        }
        let Some(socket) = self.socket.filter(|_| peek) else {
            return IdleState::Idle;
        };
        let mut byte = 0u8;
        // SAFETY: `socket` is this connection's own, open while `io` is; one
        // byte is peeked into `byte`, and nothing is consumed.
        let n = unsafe {
            libc::recv(
                socket,
                (&raw mut byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            1.. => IdleState::Spoke,
            0 => IdleState::Closed,
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock => {
                IdleState::Idle
            }
            _ => IdleState::Closed,
        }
    }

    /// Writes `request` (a whole request: head and body) and reads the
    /// answer by `deadline`. A 2xx body is kept within `budget`, or, without
    /// one, read and dropped; past [`MAX_ANSWER_BYTES`] it is not read on.
    /// The time waited for room in `budget` moves `deadline` on.
    pub async fn exchange(
        &mut self,
        request: &[u8],
        budget: Option<&AnswerBudget>,
        deadline: &mut Instant,
        now: SystemTime,
    ) -> Result<Reply, Error> {
        let written = async {
            self.io.write_all(request).await?;
            self.io.flush().await
        };
        match timeout_at(*deadline, written).await {
            Err(_) => return Err(Failure::Timeout.into()),
            Ok(Err(e)) => return Err(Error::Unanswered(format!("sending the request: {e}"))),
            Ok(Ok(())) => {}
        }
        // Bytes left from before are not part of this answer.
        self.read.clear();
        let head_too_large = || {
            Error::Failed(Failure::Network(format!(
                "the answer's head is over {} KiB",
                MAX_HEAD_BYTES >> 10
            )))
        };
        let head = loop {
            let head = match parse_head(&self.read, now) {
                // The same limit however the bytes arrived.
                Ok(Some((used, _))) if used > MAX_HEAD_BYTES => return Err(head_too_large()),
                Ok(Some((used, head))) => {
                    self.read.advance(used);
                    head
                }
                Ok(None) if self.read.len() >= MAX_HEAD_BYTES => return Err(head_too_large()),
                Ok(None) => {
                    let nothing_yet = self.read.is_empty();
                    match self.fill(*deadline).await {
                        Ok(0) if nothing_yet => {
                            return Err(Error::Unanswered(
                                "the connection was closed before an answer".into(),
                            ));
                        }
                        Ok(0) => {
                            return Err(Failure::Network(
                                "the connection was closed in the middle of the answer's head"
                                    .into(),
                            )
                            .into());
                        }
                        Ok(_) => continue,
                        Err(Failure::Network(e)) if nothing_yet => {
                            return Err(Error::Unanswered(e));
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(Failure::Network(e).into()),
            };
            if head.status.is_informational() {
                if head.status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(Failure::Network("the target switched protocols".into()).into());
                }
                continue; // 100 Continue and the like: the answer follows
            }
            break head;
        };
        // The status decides; a body too large to read does not make a 2xx a
        // failure (the target took the request), nor hide the status of one
        // that is not. Its connection is not reused.
        let budget = budget.filter(|_| head.status.is_success());
        let (answer, complete) = self.body(head.framing, budget, deadline).await?;
        Ok(Reply {
            status: head.status,
            retry_after: head.retry_after,
            answer,
            reusable: complete
                && head.keep_alive
                && head.framing != Framing::UntilClose
                && self.read.is_empty(),
        })
    }

    /// Reads more of the answer by `deadline`: how many bytes (0 at its end).
    async fn fill(&mut self, deadline: Instant) -> Result<usize, Failure> {
        self.read.reserve(READ_SIZE);
        match timeout_at(deadline, self.io.read_buf(&mut self.read)).await {
            Err(_) => Err(Failure::Timeout),
            Ok(Err(e)) => Err(Failure::Network(format!("reading the answer: {e}"))),
            Ok(Ok(n)) => Ok(n),
        }
    }

    /// More of the body, which must be there: an error when the connection
    /// ended first.
    async fn more(&mut self, deadline: Instant) -> Result<(), Failure> {
        match self.fill(deadline).await? {
            0 => Err(Failure::Network(
                "the connection was closed in the middle of the answer".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Reads the body; `true` when it was read to its end.
    async fn body(
        &mut self,
        framing: Framing,
        budget: Option<&AnswerBudget>,
        deadline: &mut Instant,
    ) -> Result<(Answer, bool), Failure> {
        let mut kept = Kept::new(budget);
        match framing {
            Framing::Empty => {}
            Framing::Length(n) => {
                if n > MAX_ANSWER_BYTES as u64 {
                    return Ok((Answer::TooLarge, false));
                }
                kept.expect(n as usize, deadline).await;
                if !self.take(n as usize, &mut kept, deadline).await? {
                    return Ok((Answer::TooLarge, false));
                }
            }
            Framing::Chunked => loop {
                let size = loop {
                    match chunk_size(&self.read)? {
                        Some((used, size)) => {
                            self.read.advance(used);
                            break size;
                        }
                        None => self.more(*deadline).await?,
                    }
                };
                if size == 0 {
                    self.trailers(*deadline).await?;
                    break;
                }
                if size > MAX_ANSWER_BYTES as u64 {
                    return Ok((Answer::TooLarge, false));
                }
                if !self.take(size as usize, &mut kept, deadline).await? {
                    return Ok((Answer::TooLarge, false));
                }
                while self.read.len() < 2 {
                    self.more(*deadline).await?;
                }
                if &self.read[..2] != b"\r\n" {
                    return Err(Failure::Network(
                        "reading the answer: a chunk does not end with a line end".into(),
                    ));
                }
                self.read.advance(2);
            },
            Framing::UntilClose => loop {
                let data = self.read.split();
                if !data.is_empty() && !kept.add(&data, deadline).await {
                    return Ok((Answer::TooLarge, false));
                }
                if self.fill(*deadline).await? == 0 {
                    break;
                }
            },
        }
        Ok((kept.into_answer(), true))
    }

    /// Passes the next `n` bytes of the body to `kept`: `false` when they
    /// take it over [`MAX_ANSWER_BYTES`].
    async fn take(
        &mut self,
        mut n: usize,
        kept: &mut Kept<'_>,
        deadline: &mut Instant,
    ) -> Result<bool, Failure> {
        while n > 0 {
            if self.read.is_empty() {
                self.more(*deadline).await?;
            }
            let here = n.min(self.read.len());
            let data = self.read.split_to(here);
            if !kept.add(&data, deadline).await {
                return Ok(false);
            }
            n -= here;
        }
        Ok(true)
    }

    /// Skips a chunked body's trailers, up to the empty line that ends them.
    async fn trailers(&mut self, deadline: Instant) -> Result<(), Failure> {
        let mut skipped = 0;
        loop {
            match self.read.windows(2).position(|w| w == b"\r\n") {
                Some(0) => {
                    self.read.advance(2);
                    return Ok(());
                }
                Some(end) => {
                    skipped += end + 2;
                    self.read.advance(end + 2);
                }
                None => self.more(deadline).await?,
            }
            // What is held of a line not yet ended counts too.
            if skipped + self.read.len() > MAX_HEAD_BYTES {
                return Err(Failure::Network(format!(
                    "reading the answer: trailers over {} KiB",
                    MAX_HEAD_BYTES >> 10
                )));
            }
        }
    }
}

/// The body as it is read: counted, and kept when there is a budget.
struct Kept<'a> {
    budget: Option<&'a AnswerBudget>,
    data: Vec<u8>,
    total: usize,
    room: Option<Room>,
}

impl<'a> Kept<'a> {
    fn new(budget: Option<&'a AnswerBudget>) -> Self {
        Self {
            budget,
            data: Vec::new(),
            total: 0,
            room: None,
        }
    }

    /// A body of `n` bytes (at most [`MAX_ANSWER_BYTES`]) is coming: its room
    /// is taken at once when it is over [`SMALL_ANSWER_BYTES`].
    async fn expect(&mut self, n: usize, deadline: &mut Instant) {
        if let Some(budget) = self.budget {
            if n > SMALL_ANSWER_BYTES {
                self.room = Some(budget.take(n, deadline).await);
            }
            self.data.reserve_exact(n);
        }
    }

    /// `false` when `data` takes the body over [`MAX_ANSWER_BYTES`].
    async fn add(&mut self, data: &[u8], deadline: &mut Instant) -> bool {
        self.total += data.len();
        if self.total > MAX_ANSWER_BYTES {
            return false;
        }
        let Some(budget) = self.budget else {
            return true;
        };
        // Of a length not known ahead: the most an answer may take, once it
        // is more than a small one.
        if self.total > SMALL_ANSWER_BYTES && self.room.is_none() {
            self.room = Some(budget.take(MAX_ANSWER_BYTES, deadline).await);
        }
        self.data.extend_from_slice(data);
        true
    }

    fn into_answer(self) -> Answer {
        Answer::Body(Bytes::from(self.data), self.room)
    }
}

/// The answer's head at the start of `read`, and its length; `None` while
/// it is not all there.
fn parse_head(read: &[u8], now: SystemTime) -> Result<Option<(usize, Head)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let used = match response.parse(read) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("reading the answer: {e}")),
    };
    let code = response.code.unwrap_or(0);
    let status = StatusCode::from_u16(code)
        .map_err(|_| format!("reading the answer: status {code} is not valid"))?;
    let mut keep_alive = response.version == Some(1);
    let (mut length, mut chunked, mut coded) = (None, false, false);
    let mut retry_after = None;
    for header in response.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(header.value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or("reading the answer: Content-Length is not a number")?;
            if length.is_some_and(|m| m != n) {
                return Err("reading the answer: two different Content-Lengths".into());
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked only when it is the last coding applied.
            coded = true;
            chunked = header
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            for option in header.value.split(|&b| b == b',') {
                let option = option.trim_ascii();
                if option.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if option.eq_ignore_ascii_case(b"keep-alive") && response.version == Some(0)
                {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("retry-after") {
            retry_after = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| parse_retry_after(v, now));
        }
    }
    let framing = if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if coded {
        // A length beside a coding is ignored; an answer coded otherwise
        // than chunked ends with its connection.
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    Ok(Some((
        used,
        Head {
            status,
            retry_after,
            framing,
            keep_alive: keep_alive && !(coded && length.is_some()),
        },
    )))
}

/// The size line of a chunk at the start of `read` (`1a;name=value\r\n`):
/// its length and the size; `None` while it is not all there.
fn chunk_size(read: &[u8]) -> Result<Option<(usize, u64)>, Failure> {
    let bad = || Failure::Network("reading the answer: a chunk size is not valid".into());
    let Some(end) = read.windows(2).position(|w| w == b"\r\n") else {
        return if read.len() > 1024 {
            Err(bad())
        } else {
            Ok(None)
        };
    };
    let line = &read[..end];
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return Err(bad());
    }
    let mut size = 0u64;
    for &b in digits {
        let digit = (b as char).to_digit(16).ok_or_else(bad)?;
        size = size * 16 + u64::from(digit);
    }
    Ok(Some((end + 2, size)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    const REQUEST: &[u8] = b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}";

    /// A connection whose other end answers each request with `answer`,
    /// written in pieces of `piece` bytes, and then closes if `close`.
    fn target(answers: Vec<Vec<u8>>, piece: usize, close: bool) -> Connection<DuplexStream> {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            for answer in answers {
                let mut request = vec![0u8; REQUEST.len()];
                if far.read_exact(&mut request).await.is_err() {
                    return;
                }
                assert_eq!(request, REQUEST);
                for part in answer.chunks(piece.max(1)) {
                    if far.write_all(part).await.is_err() {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
            }
            if !close {
                std::future::pending::<()>().await;
            }
        });
        Connection::new(near)
    }

    async fn send(
        conn: &mut Connection<DuplexStream>,
        budget: Option<&AnswerBudget>,
    ) -> Result<Reply, Error> {
        let mut deadline = Instant::now() + Duration::from_secs(5);
        conn.exchange(REQUEST, budget, &mut deadline, SystemTime::now())
            .await
    }

    fn body(reply: &Reply) -> &[u8] {
        match &reply.answer {
            Answer::Body(b, _) => b,
            Answer::TooLarge => panic!("too large"),
        }
    }

    #[tokio::test]
    async fn answers_of_every_framing_are_read_in_any_pieces() {
        let budget = AnswerBudget::new(MAX_ANSWER_BYTES);
        let cases: [(&[u8], &[u8], bool); 7] = [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello", true),
            (b"HTTP/1.1 204 No Content\r\n\r\n", b"", true),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1;x=y\r\n!\r\n0\r\nX-T: 1\r\n\r\n",
                b"hello!",
                true,
            ),
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                b"ok",
                true,
            ),
            (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", b"ok", false),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", false),
            (
                b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
                b"ok",
                true,
            ),
        ];
        for piece in [1, 3, 1000] {
            for (answer, expected, reusable) in cases {
                let mut conn = target(vec![answer.to_vec()], piece, false);
                let reply = send(&mut conn, Some(&budget)).await.unwrap();
                assert!(reply.status.is_success());
                assert_eq!(
                    body(&reply),
                    expected,
                    "{}",
                    String::from_utf8_lossy(answer)
                );
                assert_eq!(
                    reply.reusable,
                    reusable,
                    "{}",
                    String::from_utf8_lossy(answer)
                );
            }
        }
    }

    #[tokio::test]
    async fn a_body_without_length_ends_with_the_connection() {
        let mut conn = target(vec![b"HTTP/1.1 200 OK\r\n\r\nall of it".to_vec()], 4, true);
        let reply = send(&mut conn, Some(&AnswerBudget::new(0))).await.unwrap();
        assert_eq!(body(&reply), b"all of it");
        assert!(!reply.reusable);
    }

    #[tokio::test]
    async fn a_kept_alive_connection_carries_one_answer_after_another() {
        let answers = (0..3)
            .map(|i| format!("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n{i}").into_bytes())
            .collect();
        let mut conn = target(answers, 7, false);
        for i in 0..3 {
            let reply = send(&mut conn, Some(&AnswerBudget::new(0))).await.unwrap();
            assert_eq!(body(&reply), i.to_string().as_bytes());
            assert!(reply.reusable);
        }
    }

    #[tokio::test]
    async fn a_connection_that_got_anything_while_idle_is_not_used_again() {
        // Quiet after its answer: usable.
        let mut quiet = target(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec()],
            100,
            false,
        );
        send(&mut quiet, None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(quiet.idle_state(true), IdleState::Idle);
        // A stray answer while idle would be read as the next request's.
        let (near, mut far) = tokio::io::duplex(1 << 16);
        let mut stray = Connection::new(near);
        far.write_all(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(stray.idle_state(false), IdleState::Spoke);
        // Closed by the target while idle.
        let (near, far) = tokio::io::duplex(1 << 16);
        let mut closed = Connection::new(near);
        assert_eq!(closed.idle_state(false), IdleState::Idle);
        drop(far);
        assert_eq!(closed.idle_state(false), IdleState::Closed);
    }

    /// The runtime learns of bytes on a socket only when it next polls for
    /// events; until then its readiness says nothing came. A connection
    /// given back a moment ago is peeked at directly.
    #[tokio::test]
    async fn a_stray_answer_the_runtime_has_not_seen_yet_is_found_by_a_peek() {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let near = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut far, _) = listener.accept().unwrap();
        let fd = near.as_raw_fd();
        let mut conn = Connection::with_socket(near, fd);
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        far.write_all(answer).unwrap();
        let reply = send_raw(&mut conn).await;
        let mut request = vec![0u8; REQUEST.len()];
        far.read_exact(&mut request).unwrap();
        assert!(reply.reusable);
        assert_eq!(conn.idle_state(true), IdleState::Idle, "nothing came yet");
        // The stray arrives while the runtime is busy (this thread blocks).
        far.write_all(answer).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            conn.idle_state(false),
            IdleState::Idle,
            "the runtime's readiness lags"
        );
        assert_eq!(
            conn.idle_state(true),
            IdleState::Spoke,
            "the peek sees the stray"
        );
        drop(far);
        let closed = conn.idle_state(true);
        assert!(
            closed == IdleState::Spoke,
            "unread bytes come before the close: {closed:?}"
        );
    }

    async fn send_raw(conn: &mut Connection<tokio::net::TcpStream>) -> Reply {
        let mut deadline = Instant::now() + Duration::from_secs(5);
        conn.exchange(REQUEST, None, &mut deadline, SystemTime::now())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn trailers_that_never_end_are_refused_before_they_fill_memory() {
        let mut answer =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: ".to_vec();
        answer.extend(std::iter::repeat_n(b'a', 1 << 20));
        let mut conn = target(vec![answer], 4096, false);
        let got = send(&mut conn, None).await;
        assert!(
            matches!(&got, Err(Error::Failed(Failure::Network(e))) if e.contains("trailers")),
            "{got:?}"
        );
        assert!(
            conn.read.capacity() < 4 * MAX_HEAD_BYTES,
            "{}",
            conn.read.capacity()
        );
    }

    #[tokio::test]
    async fn a_head_over_the_limit_is_refused_however_it_arrives() {
        let mut answer = b"HTTP/1.1 200 OK\r\nX-Pad: ".to_vec();
        answer.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES + 100));
        answer.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
        for piece in [answer.len(), 4096] {
            let (near, mut far) = tokio::io::duplex(1 << 20);
            // All of it there before the first read, or a piece at a time.
            if piece == answer.len() {
                far.write_all(&answer).await.unwrap();
            }
            let mut conn = Connection::new(near);
            let writer = {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut request = vec![0u8; REQUEST.len()];
                    far.read_exact(&mut request).await.unwrap();
                    if piece != answer.len() {
                        for part in answer.chunks(piece) {
                            far.write_all(part).await.unwrap();
                        }
                    }
                    far
                })
            };
            let got = send(&mut conn, None).await;
            assert!(
                matches!(got, Err(Error::Failed(Failure::Network(_)))),
                "{got:?}"
            );
            drop(writer);
        }
    }

    #[tokio::test]
    async fn status_and_retry_after_come_with_a_failure_and_no_body_is_kept() {
        let mut conn = target(
            vec![b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\nContent-Length: 4\r\n\r\nbusy".to_vec()],
            5,
            false,
        );
        let reply = send(&mut conn, Some(&AnswerBudget::new(0))).await.unwrap();
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(body(&reply), b"", "read and dropped");
        assert!(reply.reusable);
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_not_read_and_the_connection_is_not_reused() {
        let over = MAX_ANSWER_BYTES + 1;
        let declared = format!("HTTP/1.1 200 OK\r\nContent-Length: {over}\r\n\r\n").into_bytes();
        let mut chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..=MAX_ANSWER_BYTES / 65536 {
            chunked.extend_from_slice(b"10000\r\n");
            chunked.extend_from_slice(&[b' '; 65536]);
            chunked.extend_from_slice(b"\r\n");
        }
        for answer in [declared, chunked] {
            let mut conn = target(vec![answer], 1 << 16, false);
            let reply = send(&mut conn, Some(&AnswerBudget::new(0))).await.unwrap();
            assert!(matches!(reply.answer, Answer::TooLarge));
            assert!(!reply.reusable);
        }
    }

    #[tokio::test]
    async fn a_connection_closed_before_any_answer_is_unanswered() {
        let mut conn = target(vec![Vec::new()], 1, true);
        assert!(matches!(
            send(&mut conn, None).await,
            Err(Error::Unanswered(_))
        ));
        // Cut in the middle: a failure, not sent again.
        let mut conn = target(vec![b"HTTP/1.1 200 OK\r\nContent-Le".to_vec()], 1, true);
        assert!(matches!(
            send(&mut conn, None).await,
            Err(Error::Failed(Failure::Network(_)))
        ));
        let mut conn = target(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort".to_vec()],
            1,
            true,
        );
        assert!(matches!(
            send(&mut conn, None).await,
            Err(Error::Failed(Failure::Network(_)))
        ));
    }

    #[tokio::test]
    async fn broken_answers_are_network_failures() {
        for answer in [
            &b"HTTP/1.1 2000 OK\r\n\r\n"[..],
            b"SMTP ready\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            let mut conn = target(vec![answer.to_vec()], 3, false);
            let got = send(&mut conn, None).await;
            assert!(
                matches!(got, Err(Error::Failed(Failure::Network(_)))),
                "{}: {got:?}",
                String::from_utf8_lossy(answer)
            );
        }
        let mut conn = target(vec![vec![b'a'; MAX_HEAD_BYTES + 10]], 4096, false);
        assert!(matches!(
            send(&mut conn, None).await,
            Err(Error::Failed(Failure::Network(_)))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_target_that_stops_midway_times_out() {
        let mut conn = target(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab".to_vec()],
            100,
            false,
        );
        assert!(matches!(
            send(&mut conn, None).await,
            Err(Error::Failed(Failure::Timeout))
        ));
    }
}
