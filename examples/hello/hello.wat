;; A Lambda function for the wasi-preview1 runtime, in WebAssembly text.
;; The event arrives on stdin; what the function writes to stdout is the
;; response; stderr goes to the function's log. It answers
;; {"hello":EVENT} and logs one line per event.
;;
;; Build: wat2wasm hello.wat -o hello.wasm (Debian's wabt), then zip it
;; and name it as the handler: Handler="hello.wasm".
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  ;; Constant text.
  (data (i32.const 0) "{\"hello\":")
  (data (i32.const 16) "}")
  (data (i32.const 32) "hello: greeting an event\n")
  ;; Scratch: iovecs at 64.., byte counts at 112; the event at 1024.
  (func (export "_start")
    (local $event_len i32)
    ;; Read up to 60000 bytes of the event.
    (i32.store (i32.const 64) (i32.const 1024))
    (i32.store (i32.const 68) (i32.const 60000))
    (drop (call $fd_read (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 112)))
    (local.set $event_len (i32.load (i32.const 112)))
    ;; One log line on stderr.
    (i32.store (i32.const 64) (i32.const 32))
    (i32.store (i32.const 68) (i32.const 25))
    (drop (call $fd_write (i32.const 2) (i32.const 64) (i32.const 1) (i32.const 112)))
    ;; The response: prefix, event, suffix, in one gathered write.
    (i32.store (i32.const 64) (i32.const 0))
    (i32.store (i32.const 68) (i32.const 9))
    (i32.store (i32.const 72) (i32.const 1024))
    (i32.store (i32.const 76) (local.get $event_len))
    (i32.store (i32.const 80) (i32.const 16))
    (i32.store (i32.const 84) (i32.const 1))
    (drop (call $fd_write (i32.const 1) (i32.const 64) (i32.const 3) (i32.const 112)))))
