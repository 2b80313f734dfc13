//! TCP transport on mio (epoll): in progress.
