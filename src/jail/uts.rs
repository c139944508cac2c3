//! Step 3a: the jail's host name, in its own UTS namespace. The NIS domain name is reset too,
//! since a new UTS namespace starts with a copy of the host's.

use super::error::{JailError, Step, StepExt};

pub(crate) fn set_names(hostname: &str) -> Result<(), JailError> {
    nix::unistd::sethostname(hostname).step(Step::Hostname, || format!("sethostname {hostname}"))?;
    let domain = c"(none)";
    // SAFETY: the pointer and length describe a valid, NUL-free byte string that outlives the call.
    let r = unsafe { libc::setdomainname(domain.as_ptr(), domain.to_bytes().len()) };
    if r != 0 {
        return Err(JailError::new(Step::Hostname, format!("setdomainname: {}", std::io::Error::last_os_error())));
    }
    Ok(())
}
