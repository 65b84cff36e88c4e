//! Body types: the request body forwarded upstream (recoverable when the
//! connection fails before it is read, so the request can go to another
//! endpoint), and the response body sent back (streamed, and carrying the
//! guards that count the request as outstanding until it is finished).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::metrics::InFlight;
use crate::table::Outstanding;

/// Where a client's request body waits until an upstream connection first
/// reads it. If the connection attempt fails first, the body is still here
/// and can be handed to a request to another endpoint.
#[derive(Debug)]
pub(crate) struct BodySlot(Mutex<Option<Incoming>>, AtomicBool);

impl BodySlot {
    pub fn new(body: Incoming) -> Arc<Self> {
        Arc::new(BodySlot(Mutex::new(Some(body)), AtomicBool::new(false)))
    }

    fn take(&self) -> Option<Incoming> {
        // Only ever a take or a peek; poisoning cannot leave it inconsistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Whether the body was cut off for going over the app's size limit.
    pub fn too_large(&self) -> bool {
        self.1.load(Ordering::Relaxed)
    }

    /// Whether no upstream connection has started reading the body yet.
    pub fn untouched(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

/// The request body as given to the upstream client: takes the client's body
/// out of its [`BodySlot`] on first read and streams it frame by frame.
#[derive(Debug)]
pub(crate) struct ForwardBody {
    slot: Arc<BodySlot>,
    body: Option<Incoming>,
    /// Hints of the client's body, captured before it was put in the slot,
    /// so that the upstream connection can decide on `Content-Length` vs
    /// chunked (or no body at all) without taking it.
    end_stream: bool,
    hint: SizeHint,
    /// Set once the slot has been emptied, so it is never locked again.
    drained: bool,
    /// The app's body size limit, if any, and the bytes sent so far.
    limit: Option<u64>,
    sent: u64,
}

/// The error a request body ends with when it goes over the app's limit.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than the app's limit of {0} bytes")]
pub(crate) struct TooLarge(pub u64);

impl ForwardBody {
    pub fn new(slot: Arc<BodySlot>, end_stream: bool, hint: SizeHint, limit: Option<u64>) -> Self {
        ForwardBody {
            slot,
            body: None,
            end_stream,
            hint,
            drained: false,
            limit,
            sent: 0,
        }
    }
}

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.body.is_none() {
            if this.drained {
                return Poll::Ready(None);
            }
            this.drained = true;
            this.body = this.slot.take();
        }
        let Some(b) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(b).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(limit), Some(data)) = (this.limit, frame.data_ref()) {
                    this.sent += data.len() as u64;
                    if this.sent > limit {
                        this.slot.1.store(true, Ordering::Relaxed);
                        this.body = None;
                        return Poll::Ready(Some(Err(Box::new(TooLarge(limit)))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Some(b) => b.is_end_stream(),
            None => self.end_stream || self.drained,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Some(b) => b.size_hint(),
            None => self.hint,
        }
    }
}

/// Keeps a request counted (in flight for its app, outstanding on its
/// endpoint) for as long as it lives.
#[derive(Debug, Default)]
pub(crate) struct Guards {
    /// Held for its `Drop` only.
    pub _in_flight: Option<InFlight>,
    pub outstanding: Option<Outstanding>,
}

/// The response body the router sends: a small fixed body it made itself,
/// or the upstream's body streamed through as it arrives.
#[derive(Debug)]
pub(crate) enum ProxyBody {
    Full(Option<Bytes>),
    Upstream {
        body: Incoming,
        /// Dropped with the body, i.e. when the response is fully sent or
        /// the client went away.
        _guards: Guards,
    },
}

impl ProxyBody {
    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        ProxyBody::Full(if b.is_empty() { None } else { Some(b) })
    }

    pub fn empty() -> Self {
        ProxyBody::Full(None)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream { body, .. } => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Upstream { body, .. } => body.size_hint(),
        }
    }
}
