//! [`Transport`]: the channel with the caller's token, whose request bodies tell HTTP/2 they
//! are done with their last DATA frame.
//!
//! tonic's request encoder learns that a unary request has ended only when it is polled once
//! more after the message, so hyper sends the end of the request as an empty DATA frame of
//! its own. h2 writes a DATA frame of 256 bytes or more by reference, and nothing after it
//! until that write is done: a request of that size (a produce of one 1 KiB record) then took
//! a third `writev`, and the broker often a second read and wake-up, for those 9 bytes.
//! [`EndsWithData`] looks one frame ahead, so that `is_end_stream` is already true when
//! hyper takes the last frame, and the message's own DATA frame carries END_STREAM.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use tonic::body::Body;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Status;

use crate::security::Auth;

/// The transport every client of a [`crate::Connection`] uses: the channel, with the bearer
/// token (if any) added to each call, and request bodies that end with their last frame
/// (see the module docs). A cheap clone, like the channel.
#[derive(Debug, Clone)]
pub struct Transport {
    inner: InterceptedService<Channel, Auth>,
}

impl Transport {
    /// Wraps the channel and its credentials.
    pub fn new(inner: InterceptedService<Channel, Auth>) -> Self {
        Transport { inner }
    }
}

type Inner = InterceptedService<Channel, Auth>;

impl tower_service::Service<http::Request<Body>> for Transport {
    type Response = <Inner as tower_service::Service<http::Request<Body>>>::Response;
    type Error = <Inner as tower_service::Service<http::Request<Body>>>::Error;
    type Future = <Inner as tower_service::Service<http::Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower_service::Service::<http::Request<Body>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        self.inner
            .call(request.map(|body| Body::new(EndsWithData::new(body))))
    }
}

/// A body that polls its inner body one frame ahead, so it reports its end together with
/// its last frame. Frames, trailers and errors pass through unchanged and in order.
#[derive(Debug)]
pub struct EndsWithData<B> {
    inner: B,
    /// The frame (or error) read ahead, handed out next.
    ahead: Option<Result<Frame<Bytes>, Status>>,
    /// The inner body has ended.
    inner_done: bool,
}

impl<B> EndsWithData<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        EndsWithData {
            inner,
            ahead: None,
            inner_done: false,
        }
    }
}

impl<B> http_body::Body for EndsWithData<B>
where
    B: http_body::Body<Data = Bytes, Error = Status> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let current = match this.ahead.take() {
            Some(frame) => frame,
            None if this.inner_done => return Poll::Ready(None),
            None => match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(frame) => frame,
                None => {
                    this.inner_done = true;
                    return Poll::Ready(None);
                }
            },
        };
        if current.is_ok() && !this.inner_done {
            // Ready at once for a unary request (the encoder has nothing more); a stream's
            // next message is usually not there yet (Pending), and hyper polls again.
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(None) => this.inner_done = true,
                Poll::Ready(Some(next)) => this.ahead = Some(next),
                Poll::Pending => {}
            }
        }
        Poll::Ready(Some(current))
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_none() && self.inner_done
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use http_body_util::BodyExt;

    use super::*;

    /// A body that hands out its frames and never says it ended until polled past them, as
    /// tonic's request encoder does.
    struct Frames(VecDeque<Result<Frame<Bytes>, Status>>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Ready(self.0.pop_front())
        }
    }

    fn data(s: &'static str) -> Result<Frame<Bytes>, Status> {
        Ok(Frame::data(Bytes::from_static(s.as_bytes())))
    }

    /// The last DATA frame of a unary request comes with the end: hyper then sets
    /// END_STREAM on it instead of sending an empty frame after it. Catches a body that
    /// learns its end only on the poll after the last frame.
    #[tokio::test]
    async fn the_end_is_known_with_the_last_frame() {
        let mut body = EndsWithData::new(Frames(VecDeque::from([data("message")])));
        assert!(!http_body::Body::is_end_stream(&body));
        let frame = body.frame().await.expect("a frame").expect("ok");
        assert_eq!(frame.into_data().expect("data"), "message");
        assert!(http_body::Body::is_end_stream(&body));
        assert!(body.frame().await.is_none());
    }

    /// Several frames, trailers and an error come out unchanged and in order, and the end is
    /// reported only after the last of them.
    #[tokio::test]
    async fn frames_trailers_and_errors_pass_through_in_order() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let mut body = EndsWithData::new(Frames(VecDeque::from([
            data("a"),
            data("b"),
            Ok(Frame::trailers(trailers)),
        ])));
        let mut seen = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("ok");
            let ended = http_body::Body::is_end_stream(&body);
            match frame.into_data() {
                Ok(d) => seen.push((String::from_utf8_lossy(&d).into_owned(), ended)),
                Err(f) => seen.push((format!("trailers {}", f.is_trailers()), ended)),
            }
        }
        assert_eq!(
            seen,
            [
                ("a".to_string(), false),
                ("b".to_string(), false),
                ("trailers true".to_string(), true)
            ]
        );

        let mut failing = EndsWithData::new(Frames(VecDeque::from([
            data("a"),
            Err(Status::internal("boom")),
        ])));
        assert!(failing.frame().await.expect("a").is_ok());
        assert!(!http_body::Body::is_end_stream(&failing));
        let err = failing.frame().await.expect("the error").expect_err("err");
        assert_eq!(err.message(), "boom");
    }
}
