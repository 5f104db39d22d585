// Package fuseserve is a small FUSE server for one file: a root directory
// holding the file "disk", served from a File the caller implements, over the
// classic /dev/fuse transport, with raw system calls.
//
// # Why we own it
//
// An engine that serves a volume must be replaceable while the volume is in
// use: after a crash, or for an upgrade, a new process takes over the same
// FUSE connection and no I/O fails. That needs a server that (1) starts on a
// /dev/fuse descriptor whose connection already went through FUSE_INIT
// (another process mounted it and keeps a copy of the descriptor), and (2)
// writes FUSE_NOTIFY_RESEND so the kernel delivers again the requests the
// dead server had read but not answered. No FUSE library we can use does
// both: go-fuse (v2.12.1) always reads FUSE_INIT first and has no resend;
// libfuse is C. The one-file case is small, so we own it, and with it the hot
// loop that later gets cloned descriptors, a reader per CPU and io_uring.
//
// # Use
//
// The supervisor mounts (Mount: mount(2) and the FUSE_INIT answer), keeps the
// descriptor and the Session, and hands copies of both to a server process
// (SendSession/ReceiveSession over a unix socket, or an inherited descriptor).
// The server calls Serve; a replacement calls Serve with Resend set once the
// previous server is gone (its process reaped). Serve reads and answers
// requests with one goroutine per reader and preallocated, page-aligned
// buffers: no allocation per request. With cloned descriptors
// (ServeOptions.Clones) and an AsyncFile it serves READ and WRITE
// asynchronously: one non-blocking reader per clone, many requests in
// flight per reader, bounded by the server's buffers.
//
// # Replayed writes are safe for a block device
//
// FUSE_NOTIFY_RESEND queues again every request a server had read and not
// answered, so a WRITE the dead server may have applied, entirely or in part,
// runs a second time. That is safe here because:
//
//   - A resent request is one whose reply was never written, so the kernel
//     never completed it: the loop device, and ext4 or the application above
//     it, still wait for that write. The block layer promises nothing about
//     the order of writes in flight at the same time, so no correct issuer
//     (ext4's journal, the page cache's writeback, an O_DIRECT database) has
//     two overlapping writes in flight and depends on their order; before it
//     issues a write that must land after another one (a journal commit
//     block after its log blocks, a rewrite of the same block), it waits for
//     that other write's completion. A replay therefore re-applies a write
//     whose completion nobody has seen, and no dependent write exists yet
//     that it could overwrite.
//   - If the issuer did put two overlapping writes in flight, either order is
//     a valid outcome on any block device, and a replay yields one of them:
//     per sector, the data of one of the two writes.
//   - A WRITE carries all its data and its offset; serving it is a pure
//     function of them (the engine encrypts each sector with XTS under a key
//     and a tweak that depend only on the sector: no counter, no
//     read-modify-write, since requests are whole sectors). Applying it twice
//     leaves what applying it once leaves, and a torn first attempt is
//     overwritten whole.
//   - READ, FSYNC, FLUSH, GETATTR and FALLOCATE (punch or zero a range) are
//     idempotent too.
//
// One condition belongs to the supervisor: the previous server must be unable
// to touch the backing store when the replacement resends (its process reaped
// after SIGKILL, whose pending pwrite/pread calls have then ended, or its
// Serve returned after a graceful stop). Otherwise an old attempt could land
// after the replay and after a dependent write.
//
// # Pitfalls for a supervisor
//
//   - Requests read from a cloned descriptor (FUSE_DEV_IOC_CLONE) are ended
//     with an error when the last copy of that clone is closed (the kernel's
//     fuse_dev_release), not resent: a supervisor must hold a copy of every
//     descriptor a server reads from.
//   - A process that has the file itself open must not fork and exec while
//     no server runs: exec closes the inherited (close-on-exec) descriptor,
//     which sends FLUSH and waits for a server, so the exec hangs; if that
//     exec is the next server, nothing ever answers. The supervisor never
//     opens the file (the loop device holds it, and the kernel closes nothing
//     on its behalf).
//   - The asynchronous path (AsyncFile on ServeOptions.Clones) reads the
//     clones through the Go netpoller. The serving process must then not
//     open the served file with os.OpenFile/os.Open: Go registers the file
//     with the same epoll, the kernel asks the server (FUSE_POLL) while
//     holding that epoll's lock, and the server's readers wait in it. An
//     engine never opens its own file.
//   - FUSE-over-io_uring requests in a dead server's ring entries are not
//     resent (the kernel does not walk the ring queues on
//     FUSE_NOTIFY_RESEND): until it does, takeover needs the classic
//     transport this package uses.
package fuseserve
