//! [`HookServer`]: a local HTTP server for the webhook tests, on 127.0.0.1 port 0, serving an
//! axum router until the test stops it.

use anyhow::Result;
use tokio_util::sync::CancellationToken;

/// A running test HTTP server. Stop it with [`HookServer::stop`].
#[derive(Debug)]
pub struct HookServer {
    /// `http://ADDR/hook`: where a subscription pushes.
    pub endpoint: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl HookServer {
    /// Serves `app` on 127.0.0.1 at a free port.
    pub async fn start(app: axum::Router) -> Result<HookServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}/hook", listener.local_addr()?);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await
        });
        Ok(HookServer {
            endpoint,
            stop,
            task,
        })
    }

    /// Stops the server and waits until it has.
    pub async fn stop(self) -> Result<()> {
        self.stop.cancel();
        self.task.await??;
        Ok(())
    }
}
