//! Who may do what: accounts and their SigV4 signatures, the execution
//! role's temporary credentials, and the key service that wraps every data
//! key under a master key kept in key files.

pub mod auth;
pub mod key_file;
pub mod key_service;
pub mod role_credentials;
