"""A benchmark's own control-plane and default target databases, set up as in production
(SECURITY.md): the target bootstrapped by the superuser, the API and the worker logging in as
`conveyor_platform`, tenants provisioned by `conveyor_provisioner`, and the benchmark's own
tables created and read as the tenant's role in the tenant's schema, like the jobs' statements.
"""

import os, subprocess
from urllib.parse import quote, urlsplit

BOOTSTRAP = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "sql", "target-bootstrap.sql")
# The bootstrap is idempotent; its "already exists" notices are noise here.
QUIET = dict(os.environ, PGOPTIONS="-c client_min_messages=warning")


def psql(sql, url):
    return subprocess.run(["psql", url, "-X", "-v", "ON_ERROR_STOP=1", "-tAqc", sql], check=True,
                          capture_output=True, text=True, env=QUIET).stdout.strip()


class Databases:
    """`pg`: the superuser's server URL without a database (scripts/services prints it)."""

    def __init__(self, pg, name):
        self.pg, self.control, self.target = pg, name, f"{name}_target"
        self.host = urlsplit(pg).netloc.rpartition("@")[2]

    def url(self, db=None, role="postgres"):
        return f"postgres://{role}@{self.host}/{db or self.target}"

    def env(self):
        """The platform's database settings, for the API and the worker."""
        return dict(CONVEYOR_DATABASE_URL=f"{self.pg}/{self.control}",
                    CONVEYOR_TARGET_DATABASE_URL=self.url(role="conveyor_platform"),
                    CONVEYOR_TARGET_PROVISION_URL=self.url(role="conveyor_provisioner"))

    def create(self):
        """Fresh databases (a previous run's removed first), the target bootstrapped."""
        self.drop()
        for db in (self.control, self.target):
            psql(f"CREATE DATABASE {db}", f"{self.pg}/postgres")
        subprocess.run(["psql", f"{self.pg}/{self.target}", "-X", "-q", "-v", "ON_ERROR_STOP=1",
                        "-f", BOOTSTRAP], check=True, env=QUIET, stdout=subprocess.DEVNULL)

    def tenant(self, name):
        """The id (32 hex digits) of the tenant `conveyor-api keys create` made."""
        return psql(f"SELECT replace(id::text, '-', '') FROM tenants WHERE name = '{name}'",
                    f"{self.pg}/{self.control}")

    def as_tenant(self, tenant):
        """psql URL: the target as `conveyor_platform` switched to the tenant's role, its schema
        the only search path; tables made here belong to the tenant, as a job's would."""
        options = quote(f"-c role=conveyor_t_{tenant} -c search_path=t_{tenant}", safe="")
        return f"{self.url(role='conveyor_platform')}?options={options}"

    def drop(self):
        """Both databases and their tenants' roles (roles are the server's, not a database's)."""
        admin = f"{self.pg}/postgres"
        tenants = []
        try:
            tenants = psql("SELECT replace(id::text, '-', '') FROM tenants",
                           f"{self.pg}/{self.control}").split()
        except subprocess.CalledProcessError:
            pass  # no database, or not migrated: no tenants
        for db in (self.target, self.control):
            psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)", admin)
        for tenant in tenants:
            psql(f"DROP ROLE IF EXISTS conveyor_t_{tenant}", admin)
