/*
 * nbd-ceiling: a measuring device for `npm run bench:nbd`, not a product
 * server. It is about the least an NBD server can do to export a file:
 * one process per connection, one thread, one io_uring ring that receives
 * from the socket and reads/writes the file (O_DIRECT), simple replies
 * sent out of order and batched (everything one reap completed goes out
 * in one sendmsg). Its IOPS under fio's nbd engine is the ceiling that
 * the socket hop and the wake-ups leave to any NBD server on this
 * machine; the bench prints it next to dm-remapd.
 *
 *   nbd-ceiling SOCKET_PATH FILE [--spin]
 *
 * Default: the connection loop sleeps in io_uring_enter until at least one
 * completion is there. --spin: it never sleeps and polls the ring (burns
 * one CPU per connection; the upper bound).
 *
 * Protocol (NBD fixed newstyle, see NetworkBlockDevice/nbd doc/proto.md):
 * handshake flags FIXED_NEWSTYLE|NO_ZEROES; NBD_OPT_GO, NBD_OPT_INFO
 * (NBD_INFO_EXPORT, and NBD_INFO_BLOCK_SIZE when asked), NBD_OPT_EXPORT_NAME
 * and NBD_OPT_ABORT; every other option gets NBD_REP_ERR_UNSUP, so clients
 * use simple replies. Transmission flags HAS_FLAGS|SEND_FLUSH|SEND_FUA;
 * commands READ, WRITE (FUA = RWF_DSYNC), FLUSH (fdatasync), DISC; any
 * other command gets EINVAL. No TLS, no trim, no zeroes, no structured
 * replies, one export whatever its name.
 *
 * The listening process forks a child per connection; on SIGTERM/SIGINT it
 * kills its children, removes the socket and exits.
 *
 * Build: gcc -O2 -Wall -o nbd-ceiling nbd-ceiling.c -luring
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <linux/fs.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---------------------------------------------------------------- protocol */

#define NBD_MAGIC_INIT 0x4e42444d41474943ULL /* "NBDMAGIC" */
#define NBD_MAGIC_OPT 0x49484156454f5054ULL  /* "IHAVEOPT" */
#define NBD_MAGIC_OPT_REPLY 0x3e889045565a9ULL
#define NBD_MAGIC_REQUEST 0x25609513U
#define NBD_MAGIC_SIMPLE_REPLY 0x67446698U

#define NBD_FLAG_FIXED_NEWSTYLE (1U << 0)
#define NBD_FLAG_NO_ZEROES (1U << 1)
#define NBD_FLAG_C_FIXED_NEWSTYLE (1U << 0)
#define NBD_FLAG_C_NO_ZEROES (1U << 1)

#define NBD_FLAG_HAS_FLAGS (1U << 0)
#define NBD_FLAG_SEND_FLUSH (1U << 2)
#define NBD_FLAG_SEND_FUA (1U << 3)
#define TRANSMISSION_FLAGS (NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA)

#define NBD_OPT_EXPORT_NAME 1
#define NBD_OPT_ABORT 2
#define NBD_OPT_INFO 6
#define NBD_OPT_GO 7

#define NBD_REP_ACK 1U
#define NBD_REP_INFO 3U
#define NBD_REP_ERR_UNSUP 0x80000001U
#define NBD_REP_ERR_INVALID 0x80000003U

#define NBD_INFO_EXPORT 0
#define NBD_INFO_BLOCK_SIZE 3

#define NBD_CMD_READ 0
#define NBD_CMD_WRITE 1
#define NBD_CMD_DISC 2
#define NBD_CMD_FLUSH 3
#define NBD_CMD_FLAG_FUA (1U << 0)

#define NBD_EPERM 1
#define NBD_EIO 5
#define NBD_ENOMEM 12
#define NBD_EINVAL 22
#define NBD_ENOSPC 28
#define NBD_EOVERFLOW 75
#define NBD_ENOTSUP 95
#define NBD_ESHUTDOWN 108

/* ---------------------------------------------------------------- sizes */

#define REQ_HEADER 28
#define REPLY_HEADER 16
#define RECV_BUF (4U << 20)     /* socket receive buffer; bigger write payloads go straight to their own buffer */
#define MAX_PAYLOAD (32U << 20) /* largest READ/WRITE accepted (advertised as the maximum block size) */
#define MIN_BLOCK 4096U         /* O_DIRECT alignment we ask clients for */
#define KEEP_BUF (4U << 20)     /* request buffers up to this size are kept for reuse */
#define RING_ENTRIES 256
#define SEND_IOVS 1024          /* IOV_MAX on Linux */
#define MAX_OPTION_DATA 65536
#define MAX_CHILDREN 256
#define RECV_TAG ((uint64_t)1)  /* user_data of the socket recv; requests use their (aligned) pointer */

static void put16(uint8_t *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }
static uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }

/* Blocking full read/write, for the handshake. 0 = done, -1 = error or EOF. */
static int read_full(int fd, void *buf, size_t n) {
  uint8_t *p = buf;
  while (n > 0) {
    ssize_t r = read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return -1;
    p += r;
    n -= (size_t)r;
  }
  return 0;
}

static int write_full(int fd, const void *buf, size_t n) {
  const uint8_t *p = buf;
  while (n > 0) {
    ssize_t r = send(fd, p, n, MSG_NOSIGNAL);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return -1;
    p += r;
    n -= (size_t)r;
  }
  return 0;
}

/* Writes all of iov[0..n) (modifies the array). 0 = done, -1 = error. */
static int writev_full(int fd, struct iovec *iov, int n) {
  while (n > 0) {
    struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)n};
    ssize_t r = sendmsg(fd, &mh, MSG_NOSIGNAL);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -1;
    size_t left = (size_t)r;
    while (n > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      iov++;
      n--;
    }
    if (n > 0) {
      iov->iov_base = (uint8_t *)iov->iov_base + left;
      iov->iov_len -= left;
    }
  }
  return 0;
}

/* ---------------------------------------------------------------- handshake */

static int opt_reply(int s, uint32_t opt, uint32_t type, const void *data, uint32_t len) {
  uint8_t h[20];
  put64(h, NBD_MAGIC_OPT_REPLY);
  put32(h + 8, opt);
  put32(h + 12, type);
  put32(h + 16, len);
  if (write_full(s, h, sizeof h) != 0) return -1;
  return len > 0 ? write_full(s, data, len) : 0;
}

/* Replies to NBD_OPT_INFO / NBD_OPT_GO. 1 = GO accepted (enter transmission), 0 = keep haggling, -1 = error. */
static int opt_info_go(int s, uint32_t opt, const uint8_t *d, uint32_t len, uint64_t size) {
  if (len < 6) return opt_reply(s, opt, NBD_REP_ERR_INVALID, NULL, 0);
  uint32_t name_len = get32(d);
  if (name_len > len - 6) return opt_reply(s, opt, NBD_REP_ERR_INVALID, NULL, 0);
  uint16_t nreq = get16(d + 4 + name_len);
  if ((uint64_t)len != 6ULL + name_len + 2ULL * nreq) return opt_reply(s, opt, NBD_REP_ERR_INVALID, NULL, 0);
  int want_block_size = 0;
  for (uint16_t i = 0; i < nreq; i++)
    if (get16(d + 6 + name_len + 2U * i) == NBD_INFO_BLOCK_SIZE) want_block_size = 1;

  uint8_t ex[12];
  put16(ex, NBD_INFO_EXPORT);
  put64(ex + 2, size);
  put16(ex + 10, TRANSMISSION_FLAGS);
  if (opt_reply(s, opt, NBD_REP_INFO, ex, sizeof ex) != 0) return -1;
  if (want_block_size) {
    uint8_t bs[14];
    put16(bs, NBD_INFO_BLOCK_SIZE);
    put32(bs + 2, MIN_BLOCK);
    put32(bs + 6, MIN_BLOCK);
    put32(bs + 10, MAX_PAYLOAD);
    if (opt_reply(s, opt, NBD_REP_INFO, bs, sizeof bs) != 0) return -1;
  }
  if (opt_reply(s, opt, NBD_REP_ACK, NULL, 0) != 0) return -1;
  return opt == NBD_OPT_GO ? 1 : 0;
}

/* Fixed newstyle handshake. 0 = transmission phase, -1 = close the connection. */
static int handshake(int s, uint64_t size) {
  uint8_t hello[18];
  put64(hello, NBD_MAGIC_INIT);
  put64(hello + 8, NBD_MAGIC_OPT);
  put16(hello + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
  if (write_full(s, hello, sizeof hello) != 0) return -1;
  uint8_t cf[4];
  if (read_full(s, cf, 4) != 0) return -1;
  uint32_t cflags = get32(cf);
  if (cflags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) return -1; /* MUST close on unknown client flags */
  int no_zeroes = (cflags & NBD_FLAG_C_NO_ZEROES) != 0;

  uint8_t *data = malloc(MAX_OPTION_DATA);
  if (data == NULL) return -1;
  int rc = -1;
  for (;;) {
    uint8_t h[16];
    if (read_full(s, h, sizeof h) != 0) break;
    if (get64(h) != NBD_MAGIC_OPT) break;
    uint32_t opt = get32(h + 8), len = get32(h + 12);
    if (len > MAX_OPTION_DATA) break; /* names are at most 4096 bytes: not a real client */
    if (len > 0 && read_full(s, data, len) != 0) break;
    if (opt == NBD_OPT_EXPORT_NAME) {
      uint8_t r[10 + 124];
      memset(r, 0, sizeof r);
      put64(r, size);
      put16(r + 8, TRANSMISSION_FLAGS);
      if (write_full(s, r, no_zeroes ? 10 : sizeof r) == 0) rc = 0;
      break;
    }
    if (opt == NBD_OPT_ABORT) {
      opt_reply(s, opt, NBD_REP_ACK, NULL, 0);
      break;
    }
    if (opt == NBD_OPT_INFO || opt == NBD_OPT_GO) {
      int r = opt_info_go(s, opt, data, len, size);
      if (r < 0) break;
      if (r == 1) {
        rc = 0;
        break;
      }
      continue;
    }
    if (opt_reply(s, opt, NBD_REP_ERR_UNSUP, NULL, 0) != 0) break;
  }
  free(data);
  return rc;
}

/* ---------------------------------------------------------------- transmission */

struct req {
  struct req *next; /* free list */
  uint8_t cookie[8]; /* as sent, echoed back */
  uint8_t hdr[REPLY_HEADER];
  uint16_t type;
  uint32_t len;
  uint32_t error; /* NBD error of the reply */
  void *buf;      /* 4096-aligned, cap bytes */
  size_t cap;
};

struct conn {
  int sock, fd, spin;
  uint64_t size;
  struct io_uring ring;
  uint8_t *rb;        /* received bytes not parsed yet: rb[0..have) */
  size_t have;
  struct req *partial; /* write whose payload is still arriving, straight into partial->buf */
  uint32_t partial_got;
  uint64_t partial_offset;
  int partial_fua;
  uint64_t skip;      /* payload bytes of a refused write still to discard */
  int recv_posted;
  int closing;        /* no more requests: EOF, NBD_CMD_DISC or a protocol error */
  int sock_dead;      /* sending failed: replies are dropped */
  unsigned inflight;
  struct req **ready; /* completed, reply not sent yet */
  size_t nready, ready_cap;
  struct req *free_reqs;
};

static void die(const char *what) {
  perror(what);
  exit(1);
}

static uint32_t nbd_errno(int e) {
  switch (e) {
    case EPERM: case EROFS: return NBD_EPERM;
    case EIO: return NBD_EIO;
    case ENOMEM: return NBD_ENOMEM;
    case EINVAL: return NBD_EINVAL;
    case ENOSPC: case EDQUOT: case EFBIG: return NBD_ENOSPC;
    case EOVERFLOW: return NBD_EOVERFLOW;
    case EOPNOTSUPP: return NBD_ENOTSUP;
    case ESHUTDOWN: return NBD_ESHUTDOWN;
    default: return NBD_EIO;
  }
}

/* A request with a buffer of at least len bytes (NULL on out of memory). */
static struct req *req_get(struct conn *c, uint32_t len) {
  struct req *r = c->free_reqs;
  if (r != NULL) {
    c->free_reqs = r->next;
  } else {
    r = calloc(1, sizeof *r);
    if (r == NULL) return NULL;
  }
  size_t need = ((size_t)len + 4095) & ~(size_t)4095;
  if (need == 0) need = 4096;
  if (r->cap < need) {
    free(r->buf);
    r->buf = NULL;
    r->cap = 0;
    if (posix_memalign(&r->buf, 4096, need) != 0) {
      r->buf = NULL;
      r->next = c->free_reqs;
      c->free_reqs = r;
      return NULL;
    }
    r->cap = need;
  }
  r->len = len;
  r->error = 0;
  return r;
}

static void req_put(struct conn *c, struct req *r) {
  if (r->cap > KEEP_BUF) {
    free(r->buf);
    r->buf = NULL;
    r->cap = 0;
  }
  r->next = c->free_reqs;
  c->free_reqs = r;
}

static void push_ready(struct conn *c, struct req *r) {
  if (c->nready == c->ready_cap) {
    size_t n = c->ready_cap ? c->ready_cap * 2 : 256;
    struct req **p = realloc(c->ready, n * sizeof *p);
    if (p == NULL) die("realloc");
    c->ready = p;
    c->ready_cap = n;
  }
  c->ready[c->nready++] = r;
}

/* A reply that needs no I/O (an error found in the header). The request
 * struct only carries the cookie, so no payload buffer is allocated. */
static void reply_now(struct conn *c, const uint8_t *cookie, uint16_t type, uint32_t error) {
  struct req *r = req_get(c, 0);
  if (r == NULL) die("out of memory");
  memcpy(r->cookie, cookie, 8);
  r->type = type;
  r->error = error;
  push_ready(c, r);
}

static struct io_uring_sqe *sqe_get(struct conn *c) {
  struct io_uring_sqe *e = io_uring_get_sqe(&c->ring);
  if (e == NULL) {
    int r = io_uring_submit(&c->ring);
    if (r < 0) {
      errno = -r;
      die("io_uring_submit");
    }
    e = io_uring_get_sqe(&c->ring);
    if (e == NULL) die("io_uring_get_sqe");
  }
  return e;
}

static void start_rw(struct conn *c, struct req *r, uint64_t offset, int fua) {
  struct io_uring_sqe *e = sqe_get(c);
  if (r->type == NBD_CMD_READ) {
    io_uring_prep_read(e, c->fd, r->buf, r->len, offset);
  } else {
    io_uring_prep_write(e, c->fd, r->buf, r->len, offset);
    if (fua) e->rw_flags = RWF_DSYNC;
  }
  io_uring_sqe_set_data(e, r);
  c->inflight++;
}

/* Parses every complete request in rb[0..have); keeps the rest. */
static void parse(struct conn *c) {
  size_t pos = 0;
  while (!c->closing) {
    size_t avail = c->have - pos;
    if (c->skip > 0) {
      size_t take = avail < c->skip ? avail : (size_t)c->skip;
      pos += take;
      c->skip -= take;
      if (c->skip > 0) break;
      continue;
    }
    if (avail < REQ_HEADER) break;
    const uint8_t *h = c->rb + pos;
    if (get32(h) != NBD_MAGIC_REQUEST) {
      fprintf(stderr, "nbd-ceiling: bad request magic, closing\n");
      c->closing = 1;
      break;
    }
    uint16_t flags = get16(h + 4), type = get16(h + 6);
    const uint8_t *cookie = h + 8;
    uint64_t offset = get64(h + 16);
    uint32_t len = get32(h + 24);
    int in_bounds = offset <= c->size && len <= c->size - offset;
    pos += REQ_HEADER;

    if (type == NBD_CMD_WRITE) {
      if (len > MAX_PAYLOAD || !in_bounds) {
        reply_now(c, cookie, type, len > MAX_PAYLOAD ? NBD_EINVAL : NBD_ENOSPC);
        c->skip = len;
        continue;
      }
      struct req *r = req_get(c, len);
      if (r == NULL) {
        reply_now(c, cookie, type, NBD_ENOMEM);
        c->skip = len;
        continue;
      }
      memcpy(r->cookie, cookie, 8);
      r->type = type;
      size_t take = c->have - pos < len ? c->have - pos : len;
      memcpy(r->buf, c->rb + pos, take);
      pos += take;
      if (take < len) { /* the rest is received straight into r->buf */
        c->partial = r;
        c->partial_got = (uint32_t)take;
        c->partial_offset = offset;
        c->partial_fua = (flags & NBD_CMD_FLAG_FUA) != 0;
        break;
      }
      start_rw(c, r, offset, (flags & NBD_CMD_FLAG_FUA) != 0);
    } else if (type == NBD_CMD_READ) {
      if (len > MAX_PAYLOAD || !in_bounds) {
        reply_now(c, cookie, type, NBD_EINVAL);
        continue;
      }
      struct req *r = req_get(c, len);
      if (r == NULL) {
        reply_now(c, cookie, type, NBD_ENOMEM);
        continue;
      }
      memcpy(r->cookie, cookie, 8);
      r->type = type;
      start_rw(c, r, offset, 0);
    } else if (type == NBD_CMD_FLUSH) {
      struct req *r = req_get(c, 0);
      if (r == NULL) die("out of memory");
      memcpy(r->cookie, cookie, 8);
      r->type = type;
      struct io_uring_sqe *e = sqe_get(c);
      io_uring_prep_fsync(e, c->fd, IORING_FSYNC_DATASYNC);
      io_uring_sqe_set_data(e, r);
      c->inflight++;
    } else if (type == NBD_CMD_DISC) {
      c->closing = 1; /* in-flight requests still complete and get their replies */
    } else {
      reply_now(c, cookie, type, NBD_EINVAL);
    }
  }
  if (c->closing) pos = c->have;
  memmove(c->rb, c->rb + pos, c->have - pos);
  c->have -= pos;
}

static void post_recv(struct conn *c) {
  struct io_uring_sqe *e = sqe_get(c);
  if (c->partial != NULL)
    io_uring_prep_recv(e, c->sock, (uint8_t *)c->partial->buf + c->partial_got, c->partial->len - c->partial_got, 0);
  else
    io_uring_prep_recv(e, c->sock, c->rb + c->have, RECV_BUF - c->have, 0);
  io_uring_sqe_set_data64(e, RECV_TAG);
  c->recv_posted = 1;
}

static void on_recv(struct conn *c, int res) {
  c->recv_posted = 0;
  if (res <= 0) { /* EOF or error: no more requests */
    if (res < 0 && res != -ECONNRESET) fprintf(stderr, "nbd-ceiling: recv: %s\n", strerror(-res));
    c->closing = 1;
    return;
  }
  if (c->partial != NULL) {
    c->partial_got += (uint32_t)res;
    if (c->partial_got == c->partial->len) {
      struct req *r = c->partial;
      c->partial = NULL;
      start_rw(c, r, c->partial_offset, c->partial_fua);
    }
    return;
  }
  c->have += (size_t)res;
  parse(c);
}

static void on_done(struct conn *c, struct req *r, int res) {
  c->inflight--;
  if (res < 0)
    r->error = nbd_errno(-res);
  else if (r->type != NBD_CMD_FLUSH && (uint32_t)res != r->len)
    r->error = NBD_EIO; /* short read or write */
  push_ready(c, r);
}

/* Sends every ready reply, as few sendmsg calls as IOV_MAX allows. */
static void send_replies(struct conn *c) {
  static struct iovec iov[SEND_IOVS];
  size_t i = 0;
  while (i < c->nready) {
    int n = 0;
    size_t j = i;
    while (j < c->nready && n + 2 <= SEND_IOVS) {
      struct req *r = c->ready[j++];
      put32(r->hdr, NBD_MAGIC_SIMPLE_REPLY);
      put32(r->hdr + 4, r->error);
      memcpy(r->hdr + 8, r->cookie, 8);
      iov[n].iov_base = r->hdr;
      iov[n++].iov_len = REPLY_HEADER;
      if (r->type == NBD_CMD_READ && r->error == 0 && r->len > 0) { /* no payload after an error */
        iov[n].iov_base = r->buf;
        iov[n++].iov_len = r->len;
      }
    }
    if (!c->sock_dead && writev_full(c->sock, iov, n) != 0) {
      c->sock_dead = 1;
      c->closing = 1;
    }
    for (; i < j; i++) req_put(c, c->ready[i]);
  }
  c->nready = 0;
}

static void wait_completions(struct conn *c) {
  int r;
  if (c->spin) {
    for (;;) {
      r = io_uring_submit_and_get_events(&c->ring);
      if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY) break;
      if (io_uring_cq_ready(&c->ring) > 0) return;
    }
  } else {
    r = io_uring_submit_and_wait(&c->ring, 1);
    if (r >= 0 || r == -EINTR || r == -EAGAIN || r == -EBUSY) return;
  }
  errno = -r;
  die("io_uring_enter");
}

static void serve(int sock, int fd, uint64_t size, int spin) {
  if (handshake(sock, size) != 0) return;
  struct conn c = {.sock = sock, .fd = fd, .spin = spin, .size = size};
  c.rb = malloc(RECV_BUF);
  if (c.rb == NULL) die("malloc");
  struct io_uring_params p = {.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN};
  int r = io_uring_queue_init_params(RING_ENTRIES, &c.ring, &p);
  if (r == -EINVAL) { /* kernel before 6.1 */
    memset(&p, 0, sizeof p);
    r = io_uring_queue_init_params(RING_ENTRIES, &c.ring, &p);
  }
  if (r < 0) {
    errno = -r;
    die("io_uring_queue_init");
  }
  while (!c.closing || c.inflight > 0 || c.recv_posted) {
    if (!c.closing && !c.recv_posted) post_recv(&c);
    wait_completions(&c);
    struct io_uring_cqe *cqe;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(&c.ring, head, cqe) {
      seen++;
      if (cqe->user_data == RECV_TAG)
        on_recv(&c, cqe->res);
      else
        on_done(&c, io_uring_cqe_get_data(cqe), cqe->res);
    }
    io_uring_cq_advance(&c.ring, seen);
    if (c.nready > 0) send_replies(&c);
  }
  if (c.nready > 0) send_replies(&c);
  io_uring_queue_exit(&c.ring);
}

/* ---------------------------------------------------------------- listener */

static const char *sock_path;
static volatile pid_t children[MAX_CHILDREN];

static void on_term(int sig) {
  (void)sig;
  for (int i = 0; i < MAX_CHILDREN; i++)
    if (children[i] > 0) kill(children[i], SIGTERM);
  unlink(sock_path);
  _exit(0);
}

static void on_child(int sig) {
  (void)sig;
  int saved = errno;
  pid_t pid;
  while ((pid = waitpid(-1, NULL, WNOHANG)) > 0)
    for (int i = 0; i < MAX_CHILDREN; i++)
      if (children[i] == pid) children[i] = 0;
  errno = saved;
}

int main(int argc, char **argv) {
  int spin = 0;
  const char *path = NULL, *file = NULL;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--spin") == 0) spin = 1;
    else if (path == NULL) path = argv[i];
    else if (file == NULL) file = argv[i];
    else path = NULL, file = NULL, i = argc;
  }
  if (path == NULL || file == NULL) {
    fprintf(stderr, "usage: nbd-ceiling SOCKET_PATH FILE [--spin]\n");
    return 2;
  }
  sock_path = path;

  int fd = open(file, O_RDWR | O_DIRECT | O_CLOEXEC);
  if (fd < 0) die(file);
  off_t end = lseek(fd, 0, SEEK_END);
  if (end < 0) die("lseek");
  uint64_t size = (uint64_t)end;

  struct sockaddr_un a = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof a.sun_path) {
    fprintf(stderr, "nbd-ceiling: socket path too long\n");
    return 2;
  }
  strcpy(a.sun_path, path);
  int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (ls < 0) die("socket");
  unlink(path);
  if (bind(ls, (struct sockaddr *)&a, sizeof a) != 0) die("bind");
  if (listen(ls, 64) != 0) die("listen");

  signal(SIGPIPE, SIG_IGN);
  struct sigaction sa = {0};
  sigemptyset(&sa.sa_mask);
  sigaddset(&sa.sa_mask, SIGTERM);
  sigaddset(&sa.sa_mask, SIGINT);
  sigaddset(&sa.sa_mask, SIGCHLD);
  sa.sa_handler = on_term;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  sa.sa_handler = on_child;
  sa.sa_flags = SA_RESTART;
  sigaction(SIGCHLD, &sa, NULL);
  sigset_t block, old;
  sigemptyset(&block);
  sigaddset(&block, SIGTERM);
  sigaddset(&block, SIGINT);
  sigaddset(&block, SIGCHLD);

  fprintf(stderr, "nbd-ceiling: serving %s (%llu bytes) on %s, %s\n", file, (unsigned long long)size, path,
          spin ? "busy-polling" : "sleeping between completions");
  pid_t parent = getpid();
  for (;;) {
    int s = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
    if (s < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      die("accept");
    }
    sigprocmask(SIG_BLOCK, &block, &old);
    int slot = -1;
    for (int i = 0; i < MAX_CHILDREN && slot < 0; i++)
      if (children[i] == 0) slot = i;
    pid_t pid = slot < 0 ? -1 : fork();
    if (pid == 0) {
      signal(SIGTERM, SIG_DFL);
      signal(SIGINT, SIG_DFL);
      signal(SIGCHLD, SIG_DFL);
      sigprocmask(SIG_SETMASK, &old, NULL);
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(0);
      close(ls);
      serve(s, fd, size, spin);
      close(s);
      _exit(0);
    }
    if (pid < 0) fprintf(stderr, "nbd-ceiling: %s, connection refused\n", slot < 0 ? "too many connections" : "fork failed");
    else children[slot] = pid;
    sigprocmask(SIG_SETMASK, &old, NULL);
    close(s);
  }
}
