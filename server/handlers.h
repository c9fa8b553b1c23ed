/* Route handlers (handlers.c, gen.c). Each answers through srv__respond*
 * or, for generations, from the engine's events. */
#ifndef PRESSD_SERVER_HANDLERS_H
#define PRESSD_SERVER_HANDLERS_H

#include "server/internal.h"

void srv__h_completions(srv_req_t *req);
void srv__h_chat(srv_req_t *req);
void srv__h_models(srv_req_t *req);
void srv__h_health(srv_req_t *req);
void srv__h_ready(srv_req_t *req);
void srv__h_version(srv_req_t *req);
void srv__h_metrics(srv_req_t *req);
void srv__h_tokenize(srv_req_t *req);
void srv__h_detokenize(srv_req_t *req);

#endif
