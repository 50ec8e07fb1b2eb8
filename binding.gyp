{
  "targets": [
    {
      "target_name": "dm_remapd",
      "sources": [
        "native/addon.cc",
        "native/backing.cc",
        "native/aligned.cc",
        "native/sys.cc",
        "native/nbd_attach.cc",
        "native/ublk.cc"
      ],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")"
      ],
      "defines": [
        "NAPI_VERSION=9",
        "NAPI_DISABLE_CPP_EXCEPTIONS",
        "NODE_ADDON_API_DISABLE_DEPRECATED"
      ],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++1y", "-std=gnu++17"],
      "cflags_cc": ["-std=c++17", "-fno-exceptions", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "libraries": [
        "-Wl,-Bstatic -luring -Wl,-Bdynamic",
        "-Wl,--exclude-libs,ALL",
        "-pthread"
      ],
      "conditions": [
        ["OS!='linux'", { "type": "none" }]
      ]
    }
  ]
}
