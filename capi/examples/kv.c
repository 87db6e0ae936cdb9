/*
 * kv.c: a key-value store in C behind the rtrs handler callback, and a
 * client whose two threads each drive a queue of their own, over shm.
 *
 *   client thread q (q = 0, 1) -- rtrs_client_submit/poll(queue q) --> session
 *   server core: kv_handler(): PUT stored at once (returns 0);
 *                GET deferred (RTRS_LATER) to the worker thread, which fills
 *                the data and calls rtrs_server_complete() from its thread
 *
 * Build and run (the test command does; see docs/embedding.md):
 *   cargo build -p rtrs-capi
 *   cc -Wall -Wextra -Werror -O2 capi/examples/kv.c -Icapi/include \
 *      -Ltarget/debug -lrtrs -Wl,-rpath,$PWD/target/debug -lpthread -o kv-c
 *   ./kv-c
 * Exits 0 when every value read back matches, non-zero otherwise.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "rtrs.h"

enum { PUT = 1, GET = 2 };
enum { KEYS = 200, MAX_VALUE = 1000, DEPTH = 4, QUEUES = 2 };

/* The request header: op, then the key. */
struct hdr {
	uint32_t op;
	uint32_t key;
};

static void fail(const char *what, int err)
{
	fprintf(stderr, "kv.c: %s: %d (%s): %s\n", what, err, rtrs_strerror(err),
		rtrs_last_error());
	exit(1);
}

/* The value of key k: its length and bytes, so the reader can check them. */
static size_t value(uint32_t k, uint8_t *out)
{
	size_t len = 1 + (k * 37u) % MAX_VALUE;
	for (size_t i = 0; i < len; i++)
		out[i] = (uint8_t)(k * 31u + i);
	return len;
}

/* ---- the server: a store, and a worker that answers GETs later ---- */

struct get {
	uint64_t id;
	uint32_t key;
	uint8_t *data;
	size_t len;
};

struct store {
	pthread_mutex_t lock; /* the callback runs on every server core */
	size_t len[KEYS + 1]; /* key KEYS is never put */
	uint8_t val[KEYS + 1][MAX_VALUE];
	/* deferred GETs, for the worker: a small ring under the lock */
	struct get gets[1024];
	unsigned head, tail;
	pthread_cond_t more;
	int stop;
	struct rtrs_server *srv;
	unsigned deferred;
};

static int kv_handler(void *ctx, const struct rtrs_srv_io *io)
{
	struct store *s = ctx;
	struct hdr h;
	int ret;

	if (io->usr_len != sizeof(h))
		return -EINVAL;
	memcpy(&h, io->usr, sizeof(h));
	if (h.key > KEYS)
		return -ERANGE;
	pthread_mutex_lock(&s->lock);
	if (h.op == PUT && io->dir == RTRS_WRITE && io->data_len <= MAX_VALUE) {
		memcpy(s->val[h.key], io->data, io->data_len);
		s->len[h.key] = io->data_len;
		ret = 0;
	} else if (h.op == GET && io->dir == RTRS_READ &&
		   s->tail - s->head < 1024) {
		/* io->data stays ours until rtrs_server_complete(io->id). */
		s->gets[s->tail++ % 1024] = (struct get){
			io->id, h.key, io->data, io->data_len };
		s->deferred++;
		pthread_cond_signal(&s->more);
		ret = RTRS_LATER;
	} else {
		ret = -EINVAL;
	}
	pthread_mutex_unlock(&s->lock);
	return ret;
}

static void *worker(void *arg)
{
	struct store *s = arg;

	pthread_mutex_lock(&s->lock);
	for (;;) {
		while (s->head == s->tail && !s->stop)
			pthread_cond_wait(&s->more, &s->lock);
		if (s->head == s->tail)
			break;
		struct get g = s->gets[s->head++ % 1024];
		int err = 0;
		if (s->len[g.key] == 0) {
			err = -ENOENT;
		} else if (g.len < 4 + s->len[g.key]) {
			err = -EMSGSIZE;
		} else {
			uint32_t n = (uint32_t)s->len[g.key];
			memcpy(g.data, &n, 4);
			memcpy(g.data + 4, s->val[g.key], n);
		}
		pthread_mutex_unlock(&s->lock);
		int r;
		while ((r = rtrs_server_complete(s->srv, g.id, err)) == -EAGAIN)
			;
		if (r)
			fail("rtrs_server_complete", r);
		pthread_mutex_lock(&s->lock);
	}
	pthread_mutex_unlock(&s->lock);
	return NULL;
}

/* ---- the client: one thread per queue ---- */

struct app {
	struct rtrs_client *clt;
	uint32_t q;
	unsigned checked;
	uint8_t bufs[DEPTH][4 + MAX_VALUE]; /* one per IO in flight */
};

/* Submits, retrying while every permit is in flight (polling meanwhile). */
static void submit(struct app *a, int dir, uint32_t op, uint32_t key,
		   void *data, size_t len, uint64_t tag,
		   struct rtrs_completion *c, int *nc)
{
	struct hdr h = { op, key };
	int r;

	while ((r = rtrs_client_submit(a->clt, a->q, dir, &h, sizeof(h), data,
				       len, tag)) == -EAGAIN) {
		int n = rtrs_client_poll(a->clt, a->q, c + *nc, DEPTH - *nc);
		if (n < 0)
			fail("rtrs_client_poll", n);
		*nc += n;
	}
	if (r)
		fail("rtrs_client_submit", r);
}

/* One phase over this thread's keys (k % QUEUES == q), DEPTH in flight:
 * PUTs, or GETs checked as they land. The tag is slot << 32 | key. */
static void phase(struct app *a, int dir)
{
	struct rtrs_completion c[DEPTH];
	int nc = 0, inflight = 0, busy[DEPTH] = { 0 };
	uint8_t want[MAX_VALUE];

	for (uint32_t k = a->q; k < KEYS || inflight; ) {
		if (k < KEYS && inflight < DEPTH) {
			int slot = 0;
			while (busy[slot])
				slot++;
			busy[slot] = 1;
			size_t len = dir == RTRS_WRITE ? value(k, a->bufs[slot])
						       : sizeof(a->bufs[slot]);
			submit(a, dir, dir == RTRS_WRITE ? PUT : GET, k,
			       a->bufs[slot], len, (uint64_t)slot << 32 | k, c, &nc);
			inflight++;
			k += QUEUES;
			continue;
		}
		if (!nc) {
			int n = rtrs_client_poll(a->clt, a->q, c, DEPTH);
			if (n < 0)
				fail("rtrs_client_poll", n);
			nc = n;
		}
		for (int i = 0; i < nc; i++) {
			int slot = (int)(c[i].tag >> 32);
			uint32_t key = (uint32_t)c[i].tag, n;
			if (c[i].err)
				fail(dir == RTRS_WRITE ? "a PUT" : "a GET", c[i].err);
			if (dir == RTRS_READ) {
				size_t len = value(key, want);
				memcpy(&n, a->bufs[slot], 4);
				if (n != len || memcmp(a->bufs[slot] + 4, want, len)) {
					fprintf(stderr, "kv.c: key %u read back wrong\n", key);
					exit(1);
				}
				a->checked++;
			}
			busy[slot] = 0;
			inflight--;
		}
		nc = 0;
	}
}

static void *app_thread(void *arg)
{
	phase(arg, RTRS_WRITE);
	phase(arg, RTRS_READ);
	return NULL;
}

int main(void)
{
	static struct store s = { .lock = PTHREAD_MUTEX_INITIALIZER,
				  .more = PTHREAD_COND_INITIALIZER };
	char addr[64];
	const char *addrs[1] = { addr };
	uint32_t cpus[1] = { 0 };
	pthread_t w, t[QUEUES];
	static struct app apps[QUEUES];
	struct rtrs_completion c;
	int r;

	snprintf(addr, sizeof(addr), "shm:kv-c-%d", (int)getpid());
	struct rtrs_server_cfg scfg = { .size = sizeof(scfg), .addr = addr, .cpus = cpus, .ncpus = 1,
					.queue_depth = 64, .max_chunk_size = 8192 };
	if ((r = rtrs_server_open(&scfg, kv_handler, &s, &s.srv)))
		fail("rtrs_server_open", r);
	pthread_create(&w, NULL, worker, &s);

	struct rtrs_client_cfg ccfg = { .size = sizeof(ccfg), .sessname = "kv-c", .addrs = addrs,
					.naddrs = 1, .queues = QUEUES };
	struct rtrs_client *clt;
	if ((r = rtrs_client_open(&ccfg, &clt)))
		fail("rtrs_client_open", r);

	/* Errors are codes, with a message: never a crash. */
	if (rtrs_client_submit(clt, QUEUES, RTRS_WRITE, NULL, 0, NULL, 0, 0) != -EINVAL ||
	    rtrs_client_poll(NULL, 0, &c, 1) != -EINVAL ||
	    rtrs_server_complete(s.srv, 0xdead0000ffffull, 0) != -ENOENT ||
	    strlen(rtrs_last_error()) == 0) {
		fprintf(stderr, "kv.c: bad arguments were not refused\n");
		return 1;
	}

	for (uint32_t q = 0; q < QUEUES; q++) {
		apps[q].clt = clt;
		apps[q].q = q;
		pthread_create(&t[q], NULL, app_thread, &apps[q]);
	}
	for (uint32_t q = 0; q < QUEUES; q++)
		pthread_join(t[q], NULL);

	/* A key never put: the server's -ENOENT comes back in the completion. */
	uint8_t buf[4 + MAX_VALUE];
	struct hdr h = { GET, KEYS };
	if ((r = rtrs_client_submit(clt, 0, RTRS_READ, &h, sizeof(h), buf, sizeof(buf), 7)))
		fail("rtrs_client_submit", r);
	while ((r = rtrs_client_poll(clt, 0, &c, 1)) == 0)
		;
	if (r != 1 || c.tag != 7 || c.err != -ENOENT) {
		fprintf(stderr, "kv.c: a missing key gave %d/%d\n", r, c.err);
		return 1;
	}

	if ((r = rtrs_client_close(clt)))
		fail("rtrs_client_close", r);
	pthread_mutex_lock(&s.lock);
	s.stop = 1;
	pthread_cond_signal(&s.more);
	pthread_mutex_unlock(&s.lock);
	pthread_join(w, NULL);
	if ((r = rtrs_server_close(s.srv)))
		fail("rtrs_server_close", r);
	printf("kv.c: %u keys put and read back (%u gets deferred to the worker) "
	       "over %d queues, checked\n",
	       apps[0].checked + apps[1].checked, s.deferred, QUEUES);
	return 0;
}
