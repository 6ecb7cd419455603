//! Object-store buckets of a tenant's own, that its collections follow: an ingest source
//! `{"bucket_id", "prefix"}` run on a schedule syncs the prefix's objects into a collection.
//!
//! A bucket is registered with its S3-compatible endpoint, name, region and credentials. The
//! credentials are sealed as connections' URLs are ([`crate::connections::Cipher`]: AES-256-GCM
//! under `CONVEYOR_SECRET_KEY`, bound to the tenant and the row) and never returned, logged or
//! shown by `Debug`. The endpoint obeys the outbound address rules of connections and webhooks
//! ([`crate::connections::address`]): its address is checked at registration and at every
//! sync, and the client resolves hosts through the same rules, follows no redirect and uses no
//! proxy.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use http_body::{Body, Frame, SizeHint};
use object_store::{
    aws::AmazonS3Builder,
    client::{
        ClientOptions, HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest,
        HttpResponse, HttpResponseBody, HttpService,
    },
    path::Path as Key,
    ObjectMeta, ObjectStore, ObjectStoreExt, RetryConfig,
};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::{
    fmt,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::connections::{address, AllowList, Cipher};

/// How long one request to a bucket may take, and connecting to it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long listing a prefix may take in all: a service that answers page after page (empty
/// or not) would hold the job's slot forever, each page well within its request's timeout.
const LIST_DEADLINE: Duration = Duration::from_secs(300);
/// How long the API's check of a new bucket may take (its first listing, however many empty
/// pages the service answers).
const PROBE_DEADLINE: Duration = Duration::from_secs(30);
/// Most bytes of a listing page (1,000 keys of up to 1,024 bytes, and their XML) and of an
/// error's body: object_store reads both whole.
const MAX_PAGE_BYTES: u64 = 16 << 20;
const MAX_ERROR_BYTES: u64 = 1 << 20;
/// Longest prefix, as S3 keys are at most 1,024 bytes.
pub const MAX_PREFIX: usize = 1024;

/// A bucket as the API shows it: never its credentials.
#[derive(Clone, Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct Bucket {
    pub id: Uuid,
    pub name: String,
    /// `http(s)://host[:port]` of the S3-compatible service.
    pub endpoint: String,
    /// The bucket's name at the service.
    pub bucket: String,
    pub region: String,
    pub created_at: DateTime<Utc>,
}

/// A bucket's access key. `Debug` shows neither half; serialized only to be sealed.
#[derive(Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials(***)")
    }
}

impl Credentials {
    /// Each half: 1-256 visible ASCII characters; the error names the field.
    pub fn check(&self) -> Vec<(&'static str, String)> {
        let mut errors = Vec::new();
        for (field, value) in [
            ("access_key_id", &self.access_key_id),
            ("secret_access_key", &self.secret_access_key),
        ] {
            if value.is_empty() || value.len() > 256 || !value.bytes().all(|b| b.is_ascii_graphic())
            {
                errors.push((field, "must be 1-256 visible ASCII characters".to_owned()));
            }
        }
        errors
    }
}

/// An endpoint of the accepted shape: `http` or `https`, a host, no credentials, path, query or
/// fragment. The address rules are checked apart ([`check_endpoint`]).
pub fn parse_endpoint(raw: &str) -> Result<url::Url, String> {
    let url = crate::webhooks::parse_url(raw)?;
    if url.query().is_some() || !matches!(url.path(), "" | "/") {
        return Err("must be http(s)://host[:port] with no path or query".into());
    }
    Ok(url)
}

/// The endpoint's addresses, checked against the outbound rules now.
pub async fn check_endpoint(url: &url::Url, allow: &AllowList) -> Result<(), String> {
    address::check_http_url(url, allow, "buckets")
        .await
        .map(drop)
}

/// S3's bucket naming rules: 3-63 lowercase letters, digits, dots and hyphens, starting and
/// ending with a letter or digit.
pub fn check_bucket_name(name: &str) -> Result<(), String> {
    let edge = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let ok = (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && edge(name.bytes().next())
        && edge(name.bytes().last());
    match ok {
        true => Ok(()),
        false => Err("must be 3-63 lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit".into()),
    }
}

/// 1-64 lowercase letters, digits and hyphens (`us-east-1`).
pub fn check_region(region: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&region.len())
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    match ok {
        true => Ok(()),
        false => Err("must be 1-64 lowercase letters, digits and hyphens".into()),
    }
}

/// A prefix of the bucket to follow: `/`-separated names, never `.` or `..`, no leading `/`
/// (one trailing `/` is allowed); `""` is the whole bucket.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    let parts_ok = trimmed.is_empty()
        || trimmed
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if prefix.len() > MAX_PREFIX || prefix.contains(['\0', '\\']) || !parts_ok {
        return Err(format!(
            "{prefix:?} must be a relative key prefix inside the bucket \
             (`/`-separated names, no `.` or `..`, no leading `/`)"
        ));
    }
    Ok(())
}

/// The prefix as documents' metadata and listings name it: no trailing `/`.
pub fn normalize_prefix(prefix: &str) -> &str {
    prefix.strip_suffix('/').unwrap_or(prefix)
}

/// Most buckets a tenant may hold.
pub const MAX_PER_TENANT: i64 = 20;

/// Registers a bucket, its credentials sealed; `None` when the tenant has one of that name.
#[allow(clippy::too_many_arguments)]
pub async fn create(
    db: impl sqlx::PgExecutor<'_>,
    cipher: &Cipher,
    tenant: Uuid,
    name: &str,
    endpoint: &str,
    bucket: &str,
    region: &str,
    credentials: &Credentials,
) -> sqlx::Result<Option<Bucket>> {
    let id = Uuid::now_v7();
    let sealed = cipher.encrypt(
        &serde_json::to_string(credentials).expect("two strings serialize"),
        tenant,
        id,
    );
    sqlx::query_as(
        "INSERT INTO buckets (id, tenant_id, name, endpoint, bucket, region, credentials_encrypted)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (tenant_id, name) DO NOTHING
         RETURNING id, name, endpoint, bucket, region, created_at",
    )
    .bind(id)
    .bind(tenant)
    .bind(name)
    .bind(endpoint)
    .bind(bucket)
    .bind(region)
    .bind(sealed)
    .fetch_optional(db)
    .await
}

pub async fn list(pool: &PgPool, tenant: Uuid) -> sqlx::Result<Vec<Bucket>> {
    sqlx::query_as(
        "SELECT id, name, endpoint, bucket, region, created_at FROM buckets
         WHERE tenant_id = $1 ORDER BY name",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await
}

/// The tenant's bucket; `None` for another tenant's.
pub async fn get(pool: &PgPool, tenant: Uuid, id: Uuid) -> sqlx::Result<Option<Bucket>> {
    BUCKETS.get(pool, tenant, id).await
}

pub async fn delete(db: impl sqlx::PgExecutor<'_>, tenant: Uuid, id: Uuid) -> sqlx::Result<bool> {
    BUCKETS.delete(db, tenant, id).await
}

/// Which of `ids` are the tenant's buckets, each looked up once however often it is named.
pub async fn existing(pool: &PgPool, tenant: Uuid, ids: &[Uuid]) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar("SELECT id FROM buckets WHERE tenant_id = $1 AND id = ANY($2)")
        .bind(tenant)
        .bind(ids)
        .fetch_all(pool)
        .await
}

/// What a client may see of a bucket: never its credentials.
const BUCKETS: crate::owned::Owned =
    crate::owned::Owned::new("buckets", "id, name, endpoint, bucket, region, created_at");

/// Why a registered bucket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("bucket {0} not found")]
    NotFound(Uuid),
    /// Its endpoint is refused now, or its credentials do not open; for the job's error.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// A registered bucket, ready to list and read.
pub struct Opened {
    pub bucket: Bucket,
    store: Arc<dyn ObjectStore>,
}

impl fmt::Debug for Opened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opened")
            .field("bucket", &self.bucket)
            .finish()
    }
}

/// The tenant's bucket with its credentials opened and its endpoint checked again now.
pub async fn open(
    pool: &PgPool,
    cipher: Option<&Cipher>,
    allow: &AllowList,
    tenant: Uuid,
    id: Uuid,
) -> Result<Opened, OpenError> {
    #[derive(sqlx::FromRow)]
    struct Sealed {
        #[sqlx(flatten)]
        bucket: Bucket,
        credentials_encrypted: Vec<u8>,
    }
    let row: Option<Sealed> = sqlx::query_as(
        "SELECT id, name, endpoint, bucket, region, created_at, credentials_encrypted
         FROM buckets WHERE tenant_id = $1 AND id = $2",
    )
    .bind(tenant)
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(anyhow::Error::from)?;
    let Sealed {
        bucket,
        credentials_encrypted: sealed,
    } = row.ok_or(OpenError::NotFound(id))?;
    let cipher = cipher.ok_or_else(|| anyhow::anyhow!("CONVEYOR_SECRET_KEY is not set"))?;
    let credentials: Credentials = cipher
        .decrypt(&sealed, tenant, id)
        .ok()
        .and_then(|plain| serde_json::from_str(&plain).ok())
        .ok_or_else(|| {
            tracing::error!(bucket = %id, "bucket credentials do not open");
            OpenError::Refused(format!("bucket {id}'s credentials cannot be read"))
        })?;
    let endpoint = &bucket.endpoint;
    let url = parse_endpoint(endpoint).map_err(OpenError::Refused)?;
    let store = store(&url, &bucket.bucket, &bucket.region, credentials, allow)
        .await
        .map_err(|e| match e {
            StoreError::Refused(why) => OpenError::Refused(format!("endpoint {endpoint}: {why}")),
            StoreError::Other(e) => OpenError::Other(e),
        })?;
    Ok(Opened { bucket, store })
}

/// Why a client for a bucket could not be made.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The endpoint's address is refused; for the client.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// A client of the bucket at `url`, whose endpoint passed the address rules now and whose
/// every connection resolves through them.
pub async fn store(
    url: &url::Url,
    bucket: &str,
    region: &str,
    credentials: Credentials,
    allow: &AllowList,
) -> Result<Arc<dyn ObjectStore>, StoreError> {
    check_endpoint(url, allow)
        .await
        .map_err(StoreError::Refused)?;
    let https_only = url.scheme() == "https";
    let store = AmazonS3Builder::new()
        .with_endpoint(url.as_str().trim_end_matches('/'))
        .with_bucket_name(bucket)
        .with_region(region)
        .with_access_key_id(credentials.access_key_id)
        .with_secret_access_key(credentials.secret_access_key)
        .with_allow_http(!https_only)
        .with_virtual_hosted_style_request(false)
        .with_retry(RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(30),
            ..RetryConfig::default()
        })
        .with_http_connector(CheckedConnector {
            allow: allow.clone(),
            https_only,
        })
        .build()
        .map_err(|e| StoreError::Other(anyhow::anyhow!("bucket client: {e}")))?;
    Ok(Arc::new(store))
}

/// Lists the bucket's first object: whether the endpoint, bucket and credentials work.
pub async fn probe(store: &dyn ObjectStore) -> object_store::Result<()> {
    probe_within(store, PROBE_DEADLINE).await
}

async fn probe_within(store: &dyn ObjectStore, deadline: Duration) -> object_store::Result<()> {
    use futures::StreamExt;
    match tokio::time::timeout(deadline, store.list(None).next()).await {
        Ok(first) => first.transpose().map(drop),
        Err(_) => Err(object_store::Error::Generic {
            store: "S3",
            source: format!("listing took more than {deadline:?}").into(),
        }),
    }
}

/// The HTTP client of tenants' buckets: hosts resolved through the address rules, no
/// redirect followed, no proxy, bounded in time.
#[derive(Debug)]
struct CheckedConnector {
    allow: AllowList,
    https_only: bool,
}

impl HttpConnector for CheckedConnector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(address::CheckedResolver::new(
                self.allow.clone(),
                "buckets",
            )))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .https_only(self.https_only)
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            // Sizes must be the objects' own (as object_store's own client does).
            .no_gzip()
            .no_brotli()
            .no_zstd()
            .no_deflate()
            .build()
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })?;
        Ok(HttpClient::new(BoundedClient(client)))
    }
}

/// The client's answers, bounded where object_store reads them whole (a listing's page, an
/// error's body): a service could send gigabytes as one page. They announce no size, as
/// object_store reserves what a body announces before reading it.
#[derive(Debug)]
struct BoundedClient(reqwest::Client);

#[async_trait::async_trait]
impl HttpService for BoundedClient {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let listing = request
            .uri()
            .query()
            .is_some_and(|query| query.contains("list-type"));
        let (parts, body) = HttpService::call(&self.0, request).await?.into_parts();
        let most = if !parts.status.is_success() {
            MAX_ERROR_BYTES
        } else if listing {
            MAX_PAGE_BYTES
        } else {
            // An object's bytes: streamed, and bounded by whoever reads them.
            u64::MAX
        };
        let body = HttpResponseBody::new(Bounded { body, left: most });
        Ok(HttpResponse::from_parts(parts, body))
    }
}

/// A body that announces no size and fails past `left` bytes.
struct Bounded {
    body: HttpResponseBody,
    left: u64,
}

impl Body for Bounded {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let frame = std::task::ready!(Pin::new(&mut self.body).poll_frame(cx));
        let len = match &frame {
            Some(Ok(frame)) => frame.data_ref().map_or(0, |data| data.len() as u64),
            _ => 0,
        };
        if len > self.left {
            let too_long = std::io::Error::other("the bucket's answer is too long");
            return Poll::Ready(Some(Err(HttpError::new(HttpErrorKind::Decode, too_long))));
        }
        self.left -= len;
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// What a tenant is told of a failed request to its bucket: the address rules' refusal, or
/// the failure's kind; never what the service answered (up to a MiB of whatever the endpoint
/// reaches, an operator's private network where it is allowed). The log has it all.
fn told(e: object_store::Error) -> anyhow::Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(error) = source {
        if let Some(refused) = error.downcast_ref::<address::AddressRefused>() {
            return anyhow::anyhow!("{refused}");
        }
        source = error.source();
    }
    tracing::warn!(error = %crate::telemetry::Untrusted(&e), "a bucket's request failed");
    anyhow::anyhow!(match e {
        object_store::Error::NotFound { .. } => "the bucket or object was not found",
        object_store::Error::PermissionDenied { .. } => "the credentials may not read it",
        object_store::Error::Unauthenticated { .. } => "the credentials were not accepted",
        _ => "the bucket's service failed or did not answer",
    })
}

impl Opened {
    /// The objects under `prefix` (all when empty), in key order; an error past `max`.
    pub async fn list(&self, prefix: &str, max: usize) -> anyhow::Result<Vec<ObjectMeta>> {
        self.list_within(prefix, max, LIST_DEADLINE).await
    }

    async fn list_within(
        &self,
        prefix: &str,
        max: usize,
        deadline: Duration,
    ) -> anyhow::Result<Vec<ObjectMeta>> {
        let prefix = normalize_prefix(prefix);
        let key = (!prefix.is_empty()).then(|| Key::from(prefix));
        let mut listed = self.store.list(key.as_ref());
        let mut objects = Vec::new();
        let listing = async {
            while let Some(object) = listed.try_next().await.map_err(told)? {
                objects.push(object);
                if objects.len() > max {
                    anyhow::bail!("the prefix holds more than {max} objects");
                }
            }
            Ok(())
        };
        tokio::time::timeout(deadline, listing)
            .await
            .map_err(|_| anyhow::anyhow!("listing took more than {}s", deadline.as_secs()))??;
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(objects)
    }

    /// Writes the object's bytes to `file`, refusing past `cap` bytes; how many.
    pub async fn download(
        &self,
        key: &Key,
        file: &std::path::Path,
        cap: u64,
    ) -> anyhow::Result<u64> {
        let mut out = tokio::fs::File::create(file).await?;
        let mut stream = self.store.get(key).await.map_err(told)?.into_stream();
        let mut written = 0u64;
        while let Some(chunk) = stream.try_next().await.map_err(told)? {
            written += chunk.len() as u64;
            anyhow::ensure!(written <= cap, "larger than the {cap} bytes a job may read");
            tokio::io::AsyncWriteExt::write_all(&mut out, &chunk).await?;
        }
        tokio::io::AsyncWriteExt::flush(&mut out).await?;
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn prefixes_stay_inside_the_bucket() {
        for ok in ["", "docs", "docs/", "docs/handbook", "a b/c-d_e.f"] {
            assert!(check_prefix(ok).is_ok(), "{ok}");
        }
        for bad in [
            "..",
            "../x",
            "docs/../x",
            "/docs",
            "docs//x",
            "./docs",
            "a\\b",
            "a\0",
        ] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
        assert!(check_prefix(&"a".repeat(MAX_PREFIX + 1)).is_err());
        assert_eq!(normalize_prefix("docs/"), "docs");
    }

    #[test]
    fn names_regions_and_endpoints_are_checked() {
        assert!(check_bucket_name("my-docs.2026").is_ok());
        for bad in ["ab", "Docs", "-docs", "docs-", "do_cs", &"a".repeat(64)] {
            assert!(check_bucket_name(bad).is_err(), "{bad}");
        }
        assert!(check_region("eu-west-3").is_ok());
        assert!(check_region("").is_err() && check_region("EU").is_err());
        assert!(parse_endpoint("https://s3.example.com").is_ok());
        assert!(parse_endpoint("http://127.0.0.1:9000/").is_ok());
        for bad in [
            "ftp://s3.example.com",
            "https://user:pw@s3.example.com",
            "https://s3.example.com/bucket",
            "https://s3.example.com/?x=1",
            "not a url",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_never_show_in_debug() {
        let credentials = Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "very-secret-value".into(),
        };
        let shown = format!("{credentials:?}");
        assert!(!shown.contains("very-secret-value") && !shown.contains("AKIDEXAMPLE"));
        let bad = Credentials {
            access_key_id: String::new(),
            secret_access_key: "with space".into(),
        };
        let fields: Vec<&str> = bad.check().into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["access_key_id", "secret_access_key"]);
    }

    /// A forbidden endpoint is refused before any packet leaves: an address in the URL by the
    /// check, a host name by the client's resolver too (a DNS answer that changes after the
    /// check does not get through).
    #[tokio::test]
    async fn forbidden_endpoints_are_refused_at_the_check_and_at_the_resolver() {
        let credentials = || Credentials {
            access_key_id: "id".into(),
            secret_access_key: "secret".into(),
        };
        let none = AllowList::default();
        for endpoint in [
            "http://127.0.0.1:9",
            "http://10.0.0.1:9000",
            "http://169.254.169.254",
            "http://[::1]:9",
            "http://localhost:9",
        ] {
            let url = parse_endpoint(endpoint).unwrap();
            match store(&url, "docs", "us-east-1", credentials(), &none).await {
                Err(StoreError::Refused(why)) => {
                    assert!(why.contains("buckets may not reach"), "{endpoint}: {why}")
                }
                Err(e) => panic!("{endpoint}: {e}"),
                Ok(_) => panic!("{endpoint} accepted"),
            }
        }
        // A host that passed the check (allowed then) is refused by the resolver of every
        // request once the rules refuse it.
        let url = parse_endpoint("http://localhost:9").unwrap();
        let opened = opened_unchecked(&url, &none);
        let error = format!("{:#}", opened.list("", 10).await.unwrap_err());
        assert!(error.contains("buckets may not reach"), "{error}");
    }

    /// A service on 127.0.0.1 that answers every request with `answer` and closes the
    /// connection: its URL, and the requests and bytes it served.
    async fn answering(answer: Vec<u8>) -> (url::Url, Arc<[AtomicU64; 2]>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = parse_endpoint(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        let served = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let counts = served.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = vec![0; 64 << 10];
                let _ = socket.read(&mut request).await;
                counts[0].fetch_add(1, Ordering::Relaxed);
                for piece in answer.chunks(64 << 10) {
                    if socket.write_all(piece).await.is_err() {
                        break;
                    }
                    counts[1].fetch_add(piece.len() as u64, Ordering::Relaxed);
                }
            }
        });
        (url, served)
    }

    /// An empty page with a token for the next one, for ever.
    async fn endless_empty_pages() -> (url::Url, Arc<[AtomicU64; 2]>) {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>docs</Name><Prefix></Prefix><KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>true</IsTruncated><NextContinuationToken>again</NextContinuationToken></ListBucketResult>"#;
        answering(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
        .await
    }

    /// What a service answers goes to the log, not to the tenant: a bucket at an address an
    /// operator allowed (its private network, for databases) read its services' error pages
    /// into the ingest job's error, up to a MiB.
    #[tokio::test]
    async fn a_services_answer_is_not_told() {
        let body = "INTERNAL-SECRET";
        let (url, _) = answering(
            format!(
                "HTTP/1.1 403 Forbidden\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
        .await;
        let opened = opened_unchecked(&url, &"127.0.0.1".parse().unwrap());
        let listed = format!("{:#}", opened.list("", 10).await.unwrap_err());
        let scratch = std::env::temp_dir().join(format!("conveyor-test-{}", Uuid::new_v4()));
        let key = Key::from("a.txt");
        let downloaded = format!(
            "{:#}",
            opened.download(&key, &scratch, 10).await.unwrap_err()
        );
        let _ = std::fs::remove_file(&scratch);
        for error in [listed, downloaded] {
            assert!(!error.contains(body), "{error}");
            assert!(error.starts_with("the "), "{error}");
        }
    }

    /// A service that answers every listing with an empty page and a token for the next
    /// one: the listing ends at its deadline instead of holding its job forever.
    #[tokio::test]
    async fn a_listing_of_endless_empty_pages_ends_at_its_deadline() {
        let (url, served) = endless_empty_pages().await;
        let opened = opened_unchecked(&url, &"127.0.0.1".parse().unwrap());
        let deadline = Duration::from_secs(2);
        let listed = tokio::time::timeout(
            Duration::from_secs(20),
            opened.list_within("", 10, deadline),
        )
        .await
        .expect("the listing ends");
        let error = format!("{:#}", listed.unwrap_err());
        assert_eq!(error, "listing took more than 2s");
        assert!(served[0].load(Ordering::Relaxed) > 2, "pages were served");
    }

    /// The API's check of a new bucket at the same service ends too (it held the request, and
    /// sent requests, for as long as the client waited).
    #[tokio::test]
    async fn a_bucket_check_of_endless_empty_pages_ends_at_its_deadline() {
        let (url, _) = endless_empty_pages().await;
        let opened = opened_unchecked(&url, &"127.0.0.1".parse().unwrap());
        let checked = tokio::time::timeout(
            Duration::from_secs(20),
            probe_within(opened.store.as_ref(), Duration::from_secs(2)),
        )
        .await
        .expect("the check ends");
        assert!(checked
            .unwrap_err()
            .to_string()
            .contains("listing took more than 2s"));
    }

    /// A listing page is read whole, so it is bounded: a 200 MiB page ends the read early.
    #[tokio::test]
    async fn a_listing_page_is_bounded() {
        let page = 200 << 20;
        let mut answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/xml\r\ncontent-length: {page}\r\nconnection: close\r\n\r\n"
        )
        .into_bytes();
        answer.resize(answer.len() + page, b' ');
        let (url, served) = answering(answer).await;
        let opened = opened_unchecked(&url, &"127.0.0.1".parse().unwrap());
        let checked = probe_within(opened.store.as_ref(), Duration::from_secs(60)).await;
        assert!(checked.is_err());
        let sent = served[1].load(Ordering::Relaxed);
        assert!(sent < 64 << 20, "{sent} bytes of the page were read");
    }

    /// A bucket at `url` opened past the check, for the resolver's test.
    fn opened_unchecked(url: &url::Url, allow: &AllowList) -> Opened {
        let credentials = Credentials {
            access_key_id: "id".into(),
            secret_access_key: "secret".into(),
        };
        Opened {
            bucket: Bucket {
                id: Uuid::nil(),
                name: "x".into(),
                endpoint: url.to_string(),
                bucket: "docs".into(),
                region: "us-east-1".into(),
                created_at: Utc::now(),
            },
            store: store_unchecked(url, credentials, allow),
        }
    }

    /// A client built past the check.
    fn store_unchecked(
        url: &url::Url,
        credentials: Credentials,
        allow: &AllowList,
    ) -> Arc<dyn ObjectStore> {
        Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(url.as_str().trim_end_matches('/'))
                .with_bucket_name("docs")
                .with_region("us-east-1")
                .with_access_key_id(credentials.access_key_id)
                .with_secret_access_key(credentials.secret_access_key)
                .with_allow_http(true)
                .with_retry(RetryConfig {
                    max_retries: 0,
                    ..RetryConfig::default()
                })
                .with_http_connector(CheckedConnector {
                    allow: allow.clone(),
                    https_only: false,
                })
                .build()
                .unwrap(),
        )
    }
}
