// fusepass: the reference FUSE server of bench/fuse-reference.sh. It serves
// one file, "disk", whose bytes are those of an image opened O_DIRECT, and
// does nothing else: no cipher, no header, no takeover. It is built on
// libfuse3's low-level API and its multi-threaded loop (one blocking thread
// per request in flight, cloned /dev/fuse descriptors), the way most C FUSE
// servers work, so that the benchmark can tell what any FUSE server reaches
// under a loop device on this machine, next to csi-encdisk's engine.
//
// Usage: fusepass IMAGE MOUNTPOINT (env FUSEPASS_THREADS: most threads,
// default 32). Stops on SIGINT/SIGTERM or when unmounted.
#define FUSE_USE_VERSION 312
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum { root_ino = 1, disk_ino = 2 };

static int image_fd;
static off_t image_size;

// Each thread's aligned buffer (O_DIRECT needs one), grown on demand.
static __thread char *thread_buf;
static __thread size_t thread_cap;

static char *buffer(size_t n) {
  if (n > thread_cap) {
    free(thread_buf);
    if (posix_memalign((void **)&thread_buf, 4096, n) != 0) {
      thread_buf = NULL;
      thread_cap = 0;
      return NULL;
    }
    thread_cap = n;
  }
  return thread_buf;
}

static void stat_of(fuse_ino_t ino, struct stat *st) {
  memset(st, 0, sizeof *st);
  st->st_ino = ino;
  if (ino == root_ino) {
    st->st_mode = S_IFDIR | 0755;
    st->st_nlink = 2;
  } else {
    st->st_mode = S_IFREG | 0600;
    st->st_nlink = 1;
    st->st_size = image_size;
    st->st_blksize = 4096;
  }
}

// The same connection settings as the engine's: asynchronous direct I/O
// (the loop device keeps many requests in flight) and 64 of them at most.
static void op_init(void *userdata, struct fuse_conn_info *conn) {
  (void)userdata;
  conn->max_background = 64;
  conn->congestion_threshold = 48;
  conn->want |= FUSE_CAP_ASYNC_DIO;
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
  if (parent != root_ino || strcmp(name, "disk") != 0) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  struct fuse_entry_param e;
  memset(&e, 0, sizeof e);
  e.ino = disk_ino;
  e.attr_timeout = e.entry_timeout = 3600;
  stat_of(disk_ino, &e.attr);
  fuse_reply_entry(req, &e);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  (void)fi;
  struct stat st;
  stat_of(ino, &st);
  fuse_reply_attr(req, &st, 3600);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  if (ino != disk_ino) {
    fuse_reply_err(req, EISDIR);
    return;
  }
  fi->direct_io = 1; // no page cache in the server's file, as the engine's
  fuse_reply_open(req, fi);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t n, off_t off, struct fuse_file_info *fi) {
  (void)ino, (void)fi;
  char *b = buffer(n);
  if (b == NULL) {
    fuse_reply_err(req, ENOMEM);
    return;
  }
  ssize_t got = pread(image_fd, b, n, off);
  if (got < 0)
    fuse_reply_err(req, errno);
  else
    fuse_reply_buf(req, b, (size_t)got);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *data, size_t n, off_t off,
                     struct fuse_file_info *fi) {
  (void)ino, (void)fi;
  char *b = buffer(n);
  if (b == NULL) {
    fuse_reply_err(req, ENOMEM);
    return;
  }
  memcpy(b, data, n); // the request's buffer is not aligned for O_DIRECT
  ssize_t put = pwrite(image_fd, b, n, off);
  if (put < 0)
    fuse_reply_err(req, errno);
  else
    fuse_reply_write(req, (size_t)put);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  (void)ino, (void)fi;
  fuse_reply_err(req, 0);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi) {
  (void)ino, (void)datasync, (void)fi;
  fuse_reply_err(req, fdatasync(image_fd) != 0 ? errno : 0);
}

static const struct fuse_lowlevel_ops ops = {
    .init = op_init,
    .lookup = op_lookup,
    .getattr = op_getattr,
    .open = op_open,
    .read = op_read,
    .write = op_write,
    .flush = op_flush,
    .fsync = op_fsync,
};

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: fusepass IMAGE MOUNTPOINT\n");
    return 2;
  }
  int threads = 32;
  const char *t = getenv("FUSEPASS_THREADS");
  if (t != NULL && (threads = atoi(t)) < 1) {
    fprintf(stderr, "fusepass: FUSEPASS_THREADS must be a positive number, got \"%s\"\n", t);
    return 2;
  }
  image_fd = open(argv[1], O_RDWR | O_DIRECT);
  if (image_fd < 0) {
    fprintf(stderr, "fusepass: open %s: %s\n", argv[1], strerror(errno));
    return 1;
  }
  image_size = lseek(image_fd, 0, SEEK_END);

  char *fuse_argv[] = {argv[0], "-o", "allow_other", NULL};
  struct fuse_args args = FUSE_ARGS_INIT(3, fuse_argv);
  struct fuse_session *se = fuse_session_new(&args, &ops, sizeof ops, NULL);
  if (se == NULL) {
    fprintf(stderr, "fusepass: cannot create the FUSE session\n");
    return 1;
  }
  if (fuse_session_mount(se, argv[2]) != 0) {
    fprintf(stderr, "fusepass: cannot mount on %s\n", argv[2]);
    fuse_session_destroy(se);
    return 1;
  }
  fuse_set_signal_handlers(se);
  struct fuse_loop_config *cfg = fuse_loop_cfg_create();
  fuse_loop_cfg_set_clone_fd(cfg, 1);
  fuse_loop_cfg_set_max_threads(cfg, (unsigned)threads);
  fuse_loop_cfg_set_idle_threads(cfg, (unsigned)threads);
  int rc = fuse_session_loop_mt(se, cfg);
  fuse_loop_cfg_destroy(cfg);
  fuse_remove_signal_handlers(se);
  fuse_session_unmount(se);
  fuse_session_destroy(se);
  return rc == 0 ? 0 : 1;
}
