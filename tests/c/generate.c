/*
 * Drives the C API the way a C program would, printing one `key=value` line per observation for
 * tests/capi_c.rs to check. Usage: generate MODEL_DIR PROMPT N_TOKENS
 *
 * Text is printed hex-encoded (`*_hex`) so newlines and any byte survive the trip.
 */
#include "edgemoe.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *g_prompt;
static unsigned g_n_tokens;

static void print_hex(const char *key, const char *s, size_t n) {
    printf("%s=", key);
    for (size_t i = 0; i < n; i++) printf("%02x", (unsigned char)s[i]);
    printf("\n");
}

/* A growing string the callbacks append to. */
struct text {
    char data[65536];
    size_t len;
    int pieces;
    int stop_after;                /* stop after this many pieces; 0 = never */
    int cancel_after;              /* cancel the session after this many pieces; 0 = never */
    int reenter_rc;                /* the code of a nested edgemoe_generate on the same session */
    EdgemoeSession *session;
};

static int collect(const char *piece, size_t len, void *user_data) {
    struct text *t = user_data;
    if (piece[len] != '\0') return 1; /* the piece must be NUL-terminated */
    if (t->len + len < sizeof t->data) {
        memcpy(t->data + t->len, piece, len);
        t->len += len;
    }
    t->pieces++;
    if (t->cancel_after && t->pieces == t->cancel_after) edgemoe_session_cancel(t->session);
    if (t->reenter_rc < 0) {
        char buf[8];
        t->reenter_rc = edgemoe_generate(t->session, "x", NULL, NULL, NULL, buf, sizeof buf, NULL);
    }
    return t->stop_after && t->pieces >= t->stop_after;
}

static EdgemoeGenerateParams greedy(void) {
    EdgemoeGenerateParams p = edgemoe_generate_default_params();
    p.max_tokens = g_n_tokens;
    p.temperature = 0.0f;
    return p;
}

struct job {
    EdgemoeModel *model;
    int rc;
    char text[65536];
    size_t len;
};

/* One session per thread, all at once: the threading rule's permitted case. */
static void *run_session(void *arg) {
    struct job *j = arg;
    EdgemoeSessionParams sp = edgemoe_session_default_params();
    sp.n_threads = 1;
    EdgemoeSession *s = NULL;
    j->rc = edgemoe_session_new(j->model, &sp, &s);
    if (j->rc != EDGEMOE_OK) return NULL;
    EdgemoeGenerateParams gp = greedy();
    j->rc = edgemoe_generate(s, g_prompt, &gp, NULL, NULL, j->text, sizeof j->text, &j->len);
    edgemoe_session_free(s);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL_DIR PROMPT N_TOKENS\n", argv[0]);
        return 2;
    }
    g_prompt = argv[2];
    g_n_tokens = (unsigned)atoi(argv[3]);
    printf("version=%s\n", edgemoe_version());

    /* Loading: a missing path fails with a message; NULL out-pointer is an argument error. */
    EdgemoeModel *missing = (EdgemoeModel *)1;
    printf("missing_load_rc=%d\n", edgemoe_model_load("/nonexistent/edgemoe-model", NULL, &missing));
    printf("missing_load_handle_null=%d\n", missing == NULL);
    printf("missing_load_error=%s\n", edgemoe_last_error());
    printf("null_out_load_rc=%d\n", edgemoe_model_load(argv[1], NULL, NULL));

    EdgemoeModelParams mp = edgemoe_model_default_params();
    EdgemoeModel *model = NULL;
    int rc = edgemoe_model_load(argv[1], &mp, &model);
    printf("load_rc=%d\n", rc);
    if (rc != EDGEMOE_OK) {
        fprintf(stderr, "load failed: %s\n", edgemoe_last_error());
        return 1;
    }
    size_t n_vocab = 0;
    printf("vocab_rc=%d\n", edgemoe_model_vocab_size(model, &n_vocab));
    printf("vocab_size=%zu\n", n_vocab);

    /* Tokenize: ask for the size, then fill; a short buffer reports the size needed. */
    size_t n_tokens = 0;
    printf("tokenize_query_rc=%d\n", edgemoe_tokenize(model, g_prompt, true, NULL, 0, &n_tokens));
    int32_t tokens[4096];
    size_t short_n = 0;
    printf("tokenize_small_rc=%d\n", edgemoe_tokenize(model, g_prompt, true, tokens, 1, &short_n));
    printf("tokenize_small_n=%zu\n", short_n);
    printf("tokenize_rc=%d\n", edgemoe_tokenize(model, g_prompt, true, tokens, 4096, &n_tokens));
    printf("tokens=");
    for (size_t i = 0; i < n_tokens; i++) printf(i ? ",%d" : "%d", tokens[i]);
    printf("\n");

    /* Detokenize: the full text, then a 3-byte buffer (2 bytes + NUL). */
    char text[4096];
    size_t text_len = 0;
    printf("detokenize_rc=%d\n", edgemoe_detokenize(model, tokens, n_tokens, text, sizeof text, &text_len));
    print_hex("detokenize_hex", text, text_len);
    char tiny[3];
    size_t tiny_len = 0;
    printf("detokenize_small_rc=%d\n", edgemoe_detokenize(model, tokens, n_tokens, tiny, sizeof tiny, &tiny_len));
    printf("detokenize_small_n=%zu\n", tiny_len);
    printf("detokenize_small_strlen=%zu\n", strlen(tiny));
    int32_t bad_token = -1;
    printf("detokenize_bad_token_rc=%d\n", edgemoe_detokenize(model, &bad_token, 1, text, sizeof text, &text_len));

    EdgemoeSessionParams sp = edgemoe_session_default_params();
    sp.n_threads = 2;
    EdgemoeSession *session = NULL;
    printf("session_rc=%d\n", edgemoe_session_new(model, &sp, &session));

    /* Greedy generation: the callback's pieces and the output buffer must agree. */
    EdgemoeGenerateParams gp = greedy();
    struct text streamed = {0};
    char out[65536];
    size_t out_len = 0;
    rc = edgemoe_generate(session, g_prompt, &gp, collect, &streamed, out, sizeof out, &out_len);
    printf("generate_rc=%d\n", rc);
    print_hex("text_hex", out, out_len);
    print_hex("streamed_hex", streamed.data, streamed.len);
    printf("text_strlen_matches=%d\n", strlen(out) == out_len);

    /* Output buffer too small: generation completes, the prefix is written, the size reported. */
    char small[6];
    size_t small_len = 0;
    rc = edgemoe_generate(session, g_prompt, &gp, NULL, NULL, small, sizeof small, &small_len);
    printf("generate_small_rc=%d\n", rc);
    printf("generate_small_n=%zu\n", small_len);
    print_hex("generate_small_hex", small, strlen(small));

    /* A callback that stops after 3 pieces. */
    struct text three = {0};
    three.stop_after = 3;
    rc = edgemoe_generate(session, g_prompt, &gp, collect, &three, out, sizeof out, &out_len);
    printf("stop3_rc=%d\n", rc);
    printf("stop3_pieces=%d\n", three.pieces);
    print_hex("stop3_hex", out, out_len);

    /* Cancel from inside the callback after 2 pieces (any thread may cancel). */
    struct text cancelled = {0};
    cancelled.cancel_after = 2;
    cancelled.session = session;
    rc = edgemoe_generate(session, g_prompt, &gp, collect, &cancelled, out, sizeof out, &out_len);
    printf("cancel_rc=%d\n", rc);
    printf("cancel_pieces=%d\n", cancelled.pieces);
    /* ... and the next generation is not affected by the old cancel. */
    rc = edgemoe_generate(session, g_prompt, &gp, NULL, NULL, out, sizeof out, &out_len);
    printf("after_cancel_rc=%d\n", rc);
    print_hex("after_cancel_hex", out, out_len);

    /* Re-entering the same session from its callback is refused, not raced. */
    struct text reenter = {0};
    reenter.reenter_rc = -1;
    reenter.session = session;
    reenter.stop_after = 1;
    rc = edgemoe_generate(session, g_prompt, &gp, collect, &reenter, NULL, 0, NULL);
    printf("reenter_outer_rc=%d\n", rc);
    printf("reenter_rc=%d\n", reenter.reenter_rc);

    /* Bad arguments. */
    EdgemoeGenerateParams bad = greedy();
    bad.temperature = -1.0f;
    printf("bad_temperature_rc=%d\n", edgemoe_generate(session, g_prompt, &bad, NULL, NULL, NULL, 0, NULL));
    printf("invalid_utf8_rc=%d\n", edgemoe_generate(session, "\xff\xfe", &gp, NULL, NULL, NULL, 0, NULL));
    printf("null_prompt_rc=%d\n", edgemoe_generate(session, NULL, &gp, NULL, NULL, NULL, 0, NULL));
    printf("null_session_rc=%d\n", edgemoe_generate(NULL, g_prompt, &gp, NULL, NULL, NULL, 0, NULL));
    printf("null_model_tokenize_rc=%d\n", edgemoe_tokenize(NULL, g_prompt, true, tokens, 4096, &n_tokens));
    printf("null_text_tokenize_rc=%d\n", edgemoe_tokenize(model, NULL, true, tokens, 4096, &n_tokens));
    printf("null_n_out_tokenize_rc=%d\n", edgemoe_tokenize(model, g_prompt, true, tokens, 4096, NULL));
    printf("null_buf_with_cap_rc=%d\n", edgemoe_detokenize(model, tokens, n_tokens, NULL, 10, &text_len));
    printf("null_out_session_rc=%d\n", edgemoe_session_new(model, NULL, NULL));
    printf("model_as_session_rc=%d\n",
           edgemoe_generate((EdgemoeSession *)model, g_prompt, &gp, NULL, NULL, NULL, 0, NULL));
    printf("free_null_rc=%d\n", edgemoe_session_free(NULL) | edgemoe_model_free(NULL));

    /* A KV budget: lazy eviction at 50% of prompt + max_tokens, with an observation window of
     * 8 so the budget is evicted into; tests/capi_c.rs compares with the Rust engine. */
    EdgemoeSessionParams kp = edgemoe_session_default_params();
    kp.n_threads = 2;
    kp.kv_budget_percent = 50.0f;
    kp.kv_policy = EDGEMOE_KV_POLICY_LAZY;
    kp.kv_window = 8;
    kp.kv_sinks = 4;
    EdgemoeSession *lazy = NULL;
    printf("kv_lazy_session_rc=%d\n", edgemoe_session_new(model, &kp, &lazy));
    rc = edgemoe_generate(lazy, g_prompt, &gp, NULL, NULL, out, sizeof out, &out_len);
    printf("kv_lazy_rc=%d\n", rc);
    print_hex("kv_lazy_hex", out, out_len);
    edgemoe_session_free(lazy);

    /* Bad KV options are refused with EDGEMOE_ERR_INVALID_INPUT and a message; no session. */
    struct { const char *key; EdgemoeSessionParams p; } bad_kv[9];
    for (int i = 0; i < 9; i++) {
        bad_kv[i].p = edgemoe_session_default_params();
    }
    bad_kv[0].key = "kv_bad_policy";       bad_kv[0].p.kv_policy = 9;
    bad_kv[1].key = "kv_both_budgets";     bad_kv[1].p.kv_budget_tokens = 200;
                                           bad_kv[1].p.kv_budget_percent = 50.0f;
    bad_kv[2].key = "kv_too_small";        bad_kv[2].p.kv_budget_tokens = 100;
    bad_kv[3].key = "kv_full_with_budget"; bad_kv[3].p.kv_budget_tokens = 200;
                                           bad_kv[3].p.kv_policy = EDGEMOE_KV_POLICY_FULL;
    bad_kv[4].key = "kv_h2o_no_budget";    bad_kv[4].p.kv_policy = EDGEMOE_KV_POLICY_H2O;
    bad_kv[5].key = "kv_zero_window";      bad_kv[5].p.kv_window = 0;
    bad_kv[6].key = "kv_bad_threshold";    bad_kv[6].p.kv_budget_tokens = 200;
                                           bad_kv[6].p.kv_threshold = -1.0f;
    bad_kv[7].key = "kv_bad_percent";      bad_kv[7].p.kv_budget_percent = 150.0f;
    bad_kv[8].key = "kv_bad_granularity";  bad_kv[8].p.kv_granularity = 7;
    for (int i = 0; i < 9; i++) {
        EdgemoeSession *s = (EdgemoeSession *)&bad_kv[i]; /* must come back NULL */
        rc = edgemoe_session_new(model, &bad_kv[i].p, &s);
        printf("%s_rc=%d\n", bad_kv[i].key, rc);
        printf("%s_null=%d\n", bad_kv[i].key, s == NULL);
        printf("%s_error=%s\n", bad_kv[i].key, edgemoe_last_error());
        if (s) edgemoe_session_free(s);
    }
    /* A percentage that leaves too few tokens for this generation is refused when it starts. */
    EdgemoeSessionParams tinyp = edgemoe_session_default_params();
    tinyp.kv_budget_percent = 10.0f;
    EdgemoeSession *tiny_s = NULL;
    printf("kv_tiny_session_rc=%d\n", edgemoe_session_new(model, &tinyp, &tiny_s));
    printf("kv_tiny_generate_rc=%d\n", edgemoe_generate(tiny_s, g_prompt, &gp, NULL, NULL, out, sizeof out, &out_len));
    printf("kv_tiny_generate_error=%s\n", edgemoe_last_error());
    edgemoe_session_free(tiny_s);

    /* A GPU tier without a GPU build: refused, naming why; no session. */
    EdgemoeSessionParams gpup = edgemoe_session_default_params();
    gpup.gpu_mem_bytes = 1u << 30;
    EdgemoeSession *gpu_s = NULL;
    printf("gpu_mem_session_rc=%d\n", edgemoe_session_new(model, &gpup, &gpu_s));
    printf("gpu_mem_session_error=%s\n", edgemoe_last_error());
    printf("gpu_mem_session_null=%d\n", gpu_s == NULL);
    /* Resizing a tier a session does not have is refused too. */
    EdgemoeSession *plain_s = NULL;
    edgemoe_session_new(model, NULL, &plain_s);
    printf("set_gpu_mem_rc=%d\n", edgemoe_session_set_gpu_mem(plain_s, 1u << 30));
    printf("set_gpu_mem_error=%s\n", edgemoe_last_error());
    edgemoe_session_free(plain_s);

    /* Two sessions generating at once on two threads agree with the single-threaded text. */
    struct job *jobs = calloc(2, sizeof *jobs);
    pthread_t threads[2];
    for (int i = 0; i < 2; i++) {
        jobs[i].model = model;
        pthread_create(&threads[i], NULL, run_session, &jobs[i]);
    }
    for (int i = 0; i < 2; i++) pthread_join(threads[i], NULL);
    for (int i = 0; i < 2; i++) {
        printf("thread%d_rc=%d\n", i, jobs[i].rc);
        char key[32];
        snprintf(key, sizeof key, "thread%d_hex", i);
        print_hex(key, jobs[i].text, jobs[i].len);
    }
    free(jobs);

    /* Freed handles are detected, twice over. */
    printf("session_free_rc=%d\n", edgemoe_session_free(session));
    printf("freed_session_generate_rc=%d\n", edgemoe_generate(session, g_prompt, &gp, NULL, NULL, NULL, 0, NULL));
    printf("freed_session_cancel_rc=%d\n", edgemoe_session_cancel(session));
    printf("double_free_session_rc=%d\n", edgemoe_session_free(session));
    printf("freed_error=%s\n", edgemoe_last_error());

    /* A session outlives its freed model. */
    EdgemoeSession *orphan = NULL;
    edgemoe_session_new(model, &sp, &orphan);
    printf("model_free_rc=%d\n", edgemoe_model_free(model));
    printf("freed_model_tokenize_rc=%d\n", edgemoe_tokenize(model, g_prompt, true, tokens, 4096, &n_tokens));
    printf("double_free_model_rc=%d\n", edgemoe_model_free(model));
    rc = edgemoe_generate(orphan, g_prompt, &gp, NULL, NULL, out, sizeof out, &out_len);
    printf("orphan_rc=%d\n", rc);
    print_hex("orphan_hex", out, out_len);
    printf("orphan_free_rc=%d\n", edgemoe_session_free(orphan));
    return 0;
}
