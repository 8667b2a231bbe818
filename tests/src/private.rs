//! Private RabbitMQ, Postgres and Redis instances for one test: their own ports and data
//! directories, stopped, started and restarted by pid, so the shared instances on the default
//! ports (which parallel tests use) are never touched. The servers themselves are the chaos
//! crate's ([`drover_chaos::private`]: each a direct child in its own process group under
//! `setpriv --pdeathsig`); these wrappers only turn its errors into test failures that say
//! what is missing.

use drover_chaos::private as inner;

fn ok<T>(what: &str, r: Result<T, inner::ServiceError>) -> T {
    r.unwrap_or_else(|e| panic!("private {what}: {e}"))
}

/// A Redis server of this test's own.
pub struct PrivateRedis(inner::PrivateRedis);

impl PrivateRedis {
    pub async fn launch() -> PrivateRedis {
        PrivateRedis(ok("redis", inner::PrivateRedis::launch().await))
    }

    pub fn url(&self) -> String {
        self.0.url()
    }

    pub async fn start(&mut self) {
        ok("redis start", self.0.start().await);
    }

    pub async fn stop(&mut self) {
        self.0.stop().await;
    }

    pub fn kill(&mut self) {
        self.0.kill();
    }

    pub async fn flushall(&self) {
        ok("redis FLUSHALL", self.0.flushall().await);
    }
}

/// A Postgres cluster of this test's own.
pub struct PrivatePostgres(inner::PrivatePostgres);

impl PrivatePostgres {
    pub async fn launch() -> PrivatePostgres {
        PrivatePostgres(ok("postgres", inner::PrivatePostgres::launch().await))
    }

    pub fn url(&self) -> String {
        self.0.url()
    }

    pub fn admin_url(&self) -> String {
        self.0.admin_url()
    }

    pub async fn start(&mut self) {
        ok("postgres start", self.0.start().await);
    }

    pub async fn stop(&mut self) {
        self.0.stop().await;
    }

    pub fn kill(&mut self) {
        self.0.kill();
    }
}

/// A RabbitMQ node of this test's own.
pub struct PrivateRabbit(inner::PrivateRabbit);

impl PrivateRabbit {
    pub async fn launch() -> PrivateRabbit {
        PrivateRabbit(ok("rabbitmq", inner::PrivateRabbit::launch().await))
    }

    pub fn url(&self) -> String {
        self.0.url()
    }

    pub async fn start(&mut self) {
        ok("rabbitmq start", self.0.start().await);
    }

    pub async fn stop(&mut self) {
        self.0.stop().await;
    }

    pub fn kill(&mut self) {
        self.0.kill();
    }

    /// Stop (clean shutdown), then start again on the same port and data.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start().await;
    }
}
