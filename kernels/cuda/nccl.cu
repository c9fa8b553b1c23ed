// The NCCL communicator: one process, one CUDA device per rank, communicators
// from ncclCommInitAll. NCCL is opened at run time (dlopen), so pressd starts
// on machines without it. Each rank's thread enqueues its all-reduce on its
// own backend's stream; the sums are ready in stream order.
#include <dlfcn.h>
#include <errno.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/cuda-internal.h"

extern "C" {
#include "kernels/comm.h"
}

typedef struct nccl_lib {
  void *dl;
  ncclResult_t (*comm_init_all)(ncclComm_t *, int, const int *);
  ncclResult_t (*comm_destroy)(ncclComm_t);
  ncclResult_t (*comm_abort)(ncclComm_t);
  ncclResult_t (*all_reduce)(const void *, void *, size_t, ncclDataType_t, ncclRedOp_t,
                             ncclComm_t, cudaStream_t);
  const char *(*error_string)(ncclResult_t);
} nccl_lib_t;

typedef struct nccl_comm {
  nccl_lib_t lib;
  ncclComm_t *comms;   /* owns: [n_ranks] */
  int *devices;        /* owns: [n_ranks] */
  cudaStream_t *streams; /* borrows: each rank backend's stream */
  bool dead;           /* aborted: reset re-creates the communicators */
} nccl_comm_t;

static int open_nccl(nccl_lib_t *l, char *err, size_t errlen) {
  char path[4096];
  const char *dir = getenv("PRESSD_CUDA_LIB_DIR");
  const char *names[] = {"libnccl.so.2", "libnccl.so"};
  if (dir && snprintf(path, sizeof path, "%s/libnccl.so.2", dir) < (int)sizeof path)
    l->dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  for (size_t i = 0; !l->dl && i < sizeof names / sizeof *names; i++)
    l->dl = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
  if (!l->dl) {
    snprintf(err, errlen, "cannot open NCCL (libnccl.so.2): set PRESSD_CUDA_LIB_DIR or LD_LIBRARY_PATH");
    return -ENODEV;
  }
  *(void **)&l->comm_init_all = dlsym(l->dl, "ncclCommInitAll");
  *(void **)&l->comm_destroy = dlsym(l->dl, "ncclCommDestroy");
  *(void **)&l->comm_abort = dlsym(l->dl, "ncclCommAbort");
  *(void **)&l->all_reduce = dlsym(l->dl, "ncclAllReduce");
  *(void **)&l->error_string = dlsym(l->dl, "ncclGetErrorString");
  if (!l->comm_init_all || !l->comm_destroy || !l->comm_abort || !l->all_reduce ||
      !l->error_string) {
    snprintf(err, errlen, "NCCL library lacks the functions pressd needs");
    dlclose(l->dl);
    l->dl = NULL;
    return -ENODEV;
  }
  return 0;
}

static int nccl_all_reduce(k_comm_t *comm, int32_t rank, float *buf, int64_t n) {
  nccl_comm_t *c = (nccl_comm_t *)comm->impl;
  if (rank < 0 || rank >= comm->n_ranks || n < 0) return -EINVAL;
  if (c->dead) return -ECANCELED;
  if (comm->n_ranks == 1 || n == 0) return 0;
  ncclResult_t rc = c->lib.all_reduce(buf, buf, (size_t)n, ncclFloat32, ncclSum, c->comms[rank],
                                      c->streams[rank]);
  return rc == ncclSuccess ? 0 : -EIO;
}

static void nccl_abort(k_comm_t *comm) {
  nccl_comm_t *c = (nccl_comm_t *)comm->impl;
  if (c->dead) return;
  c->dead = true;
  for (int32_t r = 0; r < comm->n_ranks; r++)
    if (c->comms[r]) c->lib.comm_abort(c->comms[r]);
  memset(c->comms, 0, (size_t)comm->n_ranks * sizeof *c->comms);
}

static void nccl_reset(k_comm_t *comm) {
  nccl_comm_t *c = (nccl_comm_t *)comm->impl;
  if (!c->dead) return;
  if (c->lib.comm_init_all(c->comms, comm->n_ranks, c->devices) == ncclSuccess) c->dead = false;
}

static void nccl_destroy(k_comm_t *comm) {
  nccl_comm_t *c = (nccl_comm_t *)comm->impl;
  if (!c) return;
  if (c->comms && !c->dead)
    for (int32_t r = 0; r < comm->n_ranks; r++)
      if (c->comms[r]) c->lib.comm_destroy(c->comms[r]);
  if (c->lib.dl) dlclose(c->lib.dl);
  free(c->comms);
  free(c->devices);
  free(c->streams);
  free(c);
}

static const k_comm_ops_t nccl_ops = {
    "nccl", nccl_all_reduce, nccl_abort, nccl_reset, nccl_destroy,
};

extern "C" int k_comm_nccl_new(k_comm_t **out, int32_t n_ranks, k_backend_t *const *bes,
                               char *err, size_t errlen) {
  *out = NULL;
  if (n_ranks < 1) return -EINVAL;
  for (int32_t r = 0; r < n_ranks; r++)
    if (!bes[r] || !bes[r]->ops || strcmp(bes[r]->ops->name, "cuda") != 0) {
      snprintf(err, errlen, "NCCL needs a CUDA backend on every rank");
      return -EINVAL;
    }
  k_comm_t *comm = (k_comm_t *)calloc(1, sizeof *comm);
  nccl_comm_t *c = (nccl_comm_t *)calloc(1, sizeof *c);
  if (!comm || !c) {
    free(comm);
    free(c);
    return -ENOMEM;
  }
  comm->ops = &nccl_ops;
  comm->n_ranks = n_ranks;
  comm->impl = c;
  int rc = open_nccl(&c->lib, err, errlen);
  if (rc) goto fail;
  c->comms = (ncclComm_t *)calloc((size_t)n_ranks, sizeof *c->comms);
  c->devices = (int *)calloc((size_t)n_ranks, sizeof *c->devices);
  c->streams = (cudaStream_t *)calloc((size_t)n_ranks, sizeof *c->streams);
  if (!c->comms || !c->devices || !c->streams) {
    rc = -ENOMEM;
    goto fail;
  }
  for (int32_t r = 0; r < n_ranks; r++) {
    c->devices[r] = kc_of(bes[r])->device;
    c->streams[r] = kc_of(bes[r])->stream;
  }
  {
    ncclResult_t nr = c->lib.comm_init_all(c->comms, n_ranks, c->devices);
    if (nr != ncclSuccess) {
      snprintf(err, errlen, "NCCL: cannot create %d communicators: %s", n_ranks,
               c->lib.error_string(nr));
      memset(c->comms, 0, (size_t)n_ranks * sizeof *c->comms);
      rc = -EIO;
      goto fail;
    }
  }
  *out = comm;
  return 0;
fail:
  k_comm_free(comm);
  return rc;
}
