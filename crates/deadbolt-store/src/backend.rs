//! The seam between the one SQL implementation ([`crate::sql`]) and the two
//! drivers: a [`Backend`] is a sqlx database (Postgres or SQLite) that says
//! its dialect and runs a statement.
//!
//! sqlx's generic bounds (every bound value `Encode<DB> + Type<DB>`, every
//! row `FromRow<DB::Row>`, `&mut DB::Connection: Executor`) are not implied
//! by a trait bound, so a generic body would have to repeat them at every
//! function. Instead they are bundled once, on the concrete side: [`Arg`]
//! is a value that both drivers encode and [`Record`] a row type that both
//! decode (both are supertrait bundles, which *are* implied), and each
//! backend implements [`Backend`]'s few I/O methods for its own concrete
//! types. The repositories are then written once over `DB: Backend`.

use std::future::Future;

use chrono::{DateTime, Utc};
use sqlx::error::BoxDynError;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::{Database, Encode, FromRow, Pool, Postgres, SqlStr, Sqlite, Type};
use uuid::Uuid;

use crate::changes::Changes;
use crate::queries::{Dialect, Stmt};

/// A value that both backends bind (encoded at once, so `'q` only has to
/// cover the call that binds it).
pub(crate) trait Arg<'q>:
    Encode<'q, Postgres> + Type<Postgres> + Encode<'q, Sqlite> + Type<Sqlite>
{
}

impl<'q, T> Arg<'q> for T where
    T: Encode<'q, Postgres> + Type<Postgres> + Encode<'q, Sqlite> + Type<Sqlite>
{
}

/// A row type that both backends decode.
pub(crate) trait Record:
    for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin
{
}

impl<T> Record for T where
    T: for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin
{
}

/// A write transaction.
pub(crate) type Tx<DB> = sqlx::Transaction<'static, DB>;

/// Where a statement runs: on the pool, or inside a transaction.
pub(crate) enum Exec<'a, DB: Database> {
    Pool(&'a Pool<DB>),
    Tx(&'a mut Tx<DB>),
}

impl<'a, DB: Database> From<&'a Pool<DB>> for Exec<'a, DB> {
    fn from(pool: &'a Pool<DB>) -> Self {
        Exec::Pool(pool)
    }
}

impl<'a, DB: Database> From<&'a mut Tx<DB>> for Exec<'a, DB> {
    fn from(tx: &'a mut Tx<DB>) -> Self {
        Exec::Tx(tx)
    }
}

/// A statement of the table with its arguments, bound as they come (an
/// encoding error is kept and returned when the statement runs, as sqlx's
/// own `bind` does).
pub(crate) struct Q<DB: Database> {
    sql: SqlStr,
    args: Result<DB::Arguments, BoxDynError>,
}

impl<DB: Backend> Q<DB> {
    pub fn new(sql: SqlStr) -> Self {
        Q {
            sql,
            args: Ok(Default::default()),
        }
    }

    pub fn bind<'q, T: Arg<'q>>(mut self, value: T) -> Self {
        if let Ok(args) = &mut self.args {
            if let Err(e) = DB::add(args, value) {
                self.args = Err(e);
            }
        }
        self
    }

    /// The text and the arguments, or the first encoding error.
    pub fn into_parts(self) -> sqlx::Result<(SqlStr, DB::Arguments)> {
        Ok((self.sql, self.args.map_err(sqlx::Error::Encode)?))
    }

    /// Runs the statement; the number of rows it changed.
    pub async fn execute<'a>(self, on: impl Into<Exec<'a, DB>>) -> sqlx::Result<u64> {
        DB::execute(on.into(), self).await
    }

    pub async fn fetch_optional<'a, O: Record>(
        self,
        on: impl Into<Exec<'a, DB>>,
    ) -> sqlx::Result<Option<O>> {
        DB::fetch_optional(on.into(), self).await
    }

    /// The one row (RowNotFound when there is none, as sqlx's `fetch_one`).
    pub async fn fetch_one<'a, O: Record>(self, on: impl Into<Exec<'a, DB>>) -> sqlx::Result<O> {
        DB::fetch_optional(on.into(), self)
            .await?
            .ok_or(sqlx::Error::RowNotFound)
    }

    pub async fn fetch_all<'a, O: Record>(
        self,
        on: impl Into<Exec<'a, DB>>,
    ) -> sqlx::Result<Vec<O>> {
        DB::fetch_all(on.into(), self).await
    }
}

/// A database the store runs on (implemented for [`Postgres`] in
/// `postgres.rs` and [`Sqlite`] in `sqlite.rs`).
pub(crate) trait Backend: Database {
    /// "postgres" or "sqlite".
    const BACKEND: &'static str;
    /// The token expansions of its statements.
    const DIALECT: Dialect;
    /// Run first in the transaction that appends an event, so that commit
    /// order equals `seq` order (watchers polling `seq > n` never skip one).
    const EVENT_LOCK: Option<Stmt>;
    /// Tells other processes that a run changed (`$1`: the change's payload).
    const NOTIFY: Option<Stmt>;

    /// Binds `value` as the next argument.
    fn add<'q, T: Arg<'q>>(args: &mut Self::Arguments, value: T) -> Result<(), BoxDynError>;

    fn execute(ex: Exec<'_, Self>, q: Q<Self>) -> impl Future<Output = sqlx::Result<u64>> + Send;

    fn fetch_optional<O: Record>(
        ex: Exec<'_, Self>,
        q: Q<Self>,
    ) -> impl Future<Output = sqlx::Result<Option<O>>> + Send;

    fn fetch_all<O: Record>(
        ex: Exec<'_, Self>,
        q: Q<Self>,
    ) -> impl Future<Output = sqlx::Result<Vec<O>>> + Send;

    /// Starts forwarding other processes' changes into `changes` (once per
    /// store; nothing where only this process writes).
    fn listen(pool: &Pool<Self>, changes: &Changes);
}

/// The I/O methods of [`Backend`], the same text for each driver (each
/// type-checked against its own concrete types).
macro_rules! backend_io {
    () => {
        fn add<'q, T: $crate::backend::Arg<'q>>(
            args: &mut <Self as sqlx::Database>::Arguments,
            value: T,
        ) -> Result<(), sqlx::error::BoxDynError> {
            sqlx::Arguments::add(args, value)
        }

        async fn execute(
            ex: $crate::backend::Exec<'_, Self>,
            q: $crate::backend::Q<Self>,
        ) -> sqlx::Result<u64> {
            let (sql, args) = q.into_parts()?;
            let query = sqlx::query_with(sql, args);
            let done = match ex {
                $crate::backend::Exec::Pool(pool) => query.execute(pool).await?,
                $crate::backend::Exec::Tx(tx) => query.execute(&mut **tx).await?,
            };
            Ok(done.rows_affected())
        }

        $crate::backend::backend_fetch!(fetch_optional, Option<O>);
        $crate::backend::backend_fetch!(fetch_all, Vec<O>);
    };
}

pub(crate) use backend_io;

/// A fetching method of [`Backend`] (of [`backend_io`]): runs `q` decoding
/// rows as `O`, returning `$out` as sqlx's method `$name` does.
macro_rules! backend_fetch {
    ($name:ident, $out:ty) => {
        async fn $name<O: $crate::backend::Record>(
            ex: $crate::backend::Exec<'_, Self>,
            q: $crate::backend::Q<Self>,
        ) -> sqlx::Result<$out> {
            let (sql, args) = q.into_parts()?;
            let query = sqlx::query_as_with::<Self, O, _>(sql, args);
            match ex {
                $crate::backend::Exec::Pool(pool) => query.$name(pool).await,
                $crate::backend::Exec::Tx(tx) => query.$name(&mut **tx).await,
            }
        }
    };
}

pub(crate) use backend_fetch;

/// A UUID column: native `UUID` on Postgres, hyphenated `TEXT` on SQLite
/// (the encodings live in the backend modules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Id(pub Uuid);

impl From<Id> for Uuid {
    fn from(id: Id) -> Uuid {
        id.0
    }
}

/// The application's clock, bound as `$1` of every statement with time
/// tokens (unused on Postgres).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock(pub DateTime<Utc>);

impl Clock {
    pub fn now() -> Self {
        Clock(Utc::now())
    }
}

/// A time given by the caller (not "now"): a `TIMESTAMPTZ` on Postgres, the
/// fixed-width text of the other times on SQLite.
#[derive(Debug, Clone, Copy)]
pub(crate) struct At(pub DateTime<Utc>);

/// A time this long after now, bound for a `{later $n}`: on Postgres as the
/// seconds to add to `now()`, on SQLite as the time by the application's clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Later(pub std::time::Duration);

/// Implements `Type<$db>` and `Encode<$db>` for each `$ty`: bound as the
/// `$target` that `$conv` makes of it (`$v`).
macro_rules! encode_as {
    ($db:ty: $($ty:ty => $target:ty, |$v:ident| $conv:expr;)+) => {$(
        impl sqlx::Type<$db> for $ty {
            fn type_info() -> <$db as sqlx::Database>::TypeInfo {
                <$target as sqlx::Type<$db>>::type_info()
            }
        }

        impl sqlx::Encode<'_, $db> for $ty {
            fn encode_by_ref(
                &self,
                buf: &mut <$db as sqlx::Database>::ArgumentBuffer,
            ) -> std::result::Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                let $v = self;
                <$target as sqlx::Encode<$db>>::encode($conv, buf)
            }
        }
    )+};
}

pub(crate) use encode_as;
