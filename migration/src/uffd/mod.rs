//! userfaultfd: opening, feature probing, write-protect.
