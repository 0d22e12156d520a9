//! The one line `rill` prints for a failed command.

/// `err` as one line, without the `error: ` prefix: each cause once, in order, joined with
/// `: `. A gRPC status in the chain contributes only its message, since the
/// [`ClientError`](crate::ClientError) wrapping it already shows that message and the code where it adds
/// something; a cause whose text is already on the line is left out.
pub fn error_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let part = match cause.downcast_ref::<tonic::Status>() {
            Some(status) => status.message().to_string(),
            None => cause.to_string(),
        };
        let part = part.trim();
        if part.is_empty() || line.contains(part) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(part);
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ClientError;

    #[test]
    fn a_broker_error_is_its_message_once() {
        let e = anyhow::Error::new(ClientError::broker(
            Some("nope"),
            None,
            tonic::Status::not_found("topic \"nope\" not found"),
        ));
        assert_eq!(error_line(&e), "topic \"nope\" not found");
    }

    #[test]
    fn the_code_stays_where_it_adds_and_context_is_kept() {
        let e = anyhow::Error::new(ClientError::broker(
            Some("t"),
            Some(0),
            tonic::Status::unavailable("the broker is shutting down"),
        ))
        .context("producing to t");
        assert_eq!(
            error_line(&e),
            "producing to t: the broker is shutting down (UNAVAILABLE; retryable)"
        );
        let io = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::NotFound))
            .context("opening in.txt");
        assert_eq!(error_line(&io), "opening in.txt: entity not found");
    }
}
