//! `InitProducer`: getting a producer id and epoch from a broker that can give one.
//!
//! In a cluster only the leader of the internal topic `__producers` gives ids; any other
//! broker forwards the request to it. The first try goes where the producer's last id came
//! from, else to the broker the producer first connected to, as on a single broker: one call,
//! no lookup. That broker may be unable to answer: cut off from the others, it can neither
//! forward to the leader nor, when it leads, commit a named producer's new epoch. So:
//! - a try that fails with UNAVAILABLE or a broken connection asks the other brokers who
//!   leads `__producers` and goes there ([`Leaders::leave`]; the next broker of the list
//!   when none knows);
//! - a try unanswered for [`crate::leaders::LEADER_CHECK_AFTER_MS`] asks them too, and is
//!   dropped for the leader they name when it leads in a newer term ([`Leaders::watch_try`]);
//!   a slow but healthy leader is waited for.
//!
//! Both retry with the producer's backoff and budget. A try dropped after its broker did give
//! an id leaves that id unused (ids are never given twice), and a named producer's epoch then
//! rises twice: the producer uses the newest, which is all the registry asks of it.

use rill_proto::v1 as pb;

use crate::connection::Connection;
use crate::error::{is_retryable_status, ClientError, Result};
use crate::leaders::{Leaders, Watched, LEADER_CHECK_AFTER_MS};
use crate::retry::RetryPolicy;

/// The internal topic whose partition 0's leader gives producer ids.
pub(super) const PRODUCERS_TOPIC: &str = "__producers";

/// A producer id and epoch (for `producer_name`'s producer when named), from a broker that
/// can give one (module doc). `origin` is the producer's bootstrap connection.
pub(super) async fn init_producer(
    origin: &Connection,
    leaders: &Leaders,
    retry: &RetryPolicy,
    producer_name: Option<String>,
) -> Result<(i64, i16)> {
    retry
        .run("init producer", || async {
            let conn = leaders
                .get(PRODUCERS_TOPIC, 0)
                .unwrap_or_else(|| origin.clone());
            let mut log = conn.log();
            let call = log.init_producer(pb::InitProducerRequest {
                producer_name: producer_name.clone(),
            });
            let answer = match leaders
                .watch_try(origin, PRODUCERS_TOPIC, 0, &conn, call)
                .await
            {
                Watched::Answer(answer) => answer,
                Watched::Moved(newer) => {
                    return Err(ClientError::broker(
                        None,
                        None,
                        tonic::Status::unavailable(format!(
                            "InitProducer: no answer from {} within {LEADER_CHECK_AFTER_MS} ms, \
                             and the other brokers name {} as leader of {PRODUCERS_TOPIC} in a \
                             newer term",
                            conn.addr(),
                            newer
                        )),
                    ))
                }
            };
            let response = match answer {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    if is_retryable_status(&status) {
                        let next = leaders.leave(origin, PRODUCERS_TOPIC, 0, &conn).await;
                        tracing::debug!(from = conn.addr(), to = ?next.as_ref().map(Connection::addr), error = %status, "InitProducer failed; asking the next broker");
                    }
                    return Err(ClientError::broker(None, None, status));
                }
            };
            let epoch = i16::try_from(response.producer_epoch).map_err(|_| {
                ClientError::Invalid(format!(
                    "the broker gave producer epoch {}, outside 0..=32767",
                    response.producer_epoch
                ))
            })?;
            Ok((response.producer_id, epoch))
        })
        .await
}
