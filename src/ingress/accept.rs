//! The accept loop every visitor-facing listener shares (the ingress ports
//! and `specter connect --listen`): a bound on connections served at once,
//! one task per connection.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Visitor connections served at once; beyond this they wait in the kernel's
/// accept queue.
pub const MAX_VISITORS: usize = 4_096;

/// Accepts visitors until `stop` fires, at most [`MAX_VISITORS`] served at
/// once (more wait in the kernel's accept queue), each in its own task.
pub async fn accept_loop<F, Fut>(listener: TcpListener, stop: CancellationToken, serve: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(MAX_VISITORS));
    loop {
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (tcp, visitor) = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    tracing::warn!(%err, "ingress accept failed");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let task = serve(tcp, visitor);
        tokio::spawn(async move {
            let _permit = permit;
            task.await;
        });
    }
}
