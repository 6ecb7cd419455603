//! Integration tests: the API and workers against the real PostgreSQL and Redis on 127.0.0.1,
//! each test with its own database and Redis key prefix. One binary, since each links the world.

mod harness;

mod attacks;
mod browser;
mod buckets;
mod bulk;
mod cli;
mod cluster;
mod collection_counts;
mod connection_attacks;
mod dashboard;
mod dashboard_screens;
mod deploy;
mod fairness;
mod faults;
mod hostile;
mod import;
mod ingest;
mod keys;
mod lifecycle;
mod limits;
mod models;
mod objects;
mod patch;
mod pipelines;
mod redis_cluster;
mod requests;
mod roles;
mod schedules;
mod search;
mod sentinel;
mod sse;
mod synthesis;
mod upload_attacks;
mod usage;
mod webhooks;
