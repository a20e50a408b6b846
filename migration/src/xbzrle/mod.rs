//! XBZRLE delta encoding and page cache.
