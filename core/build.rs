//! `sqlx::migrate!` reads `migrations/` at compile time; without this, a new migration file
//! does not rebuild the crate and the binaries silently ship the old set.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
